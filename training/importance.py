"""∇L on calibration data, for gradient-informed delta selection (`--select gradient --calib F`).

The gradient is taken at the post-trained weights (θ_base + Δ): dropping entry j of Δ moves
the loss by about −Δⱼ·∂L/∂θⱼ, so the sparse codec keeps the entries with the largest |Δ ⊙ ∇L|
(the idea of gradient-mask tuning, applied after training instead of during it).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from deltas import DeltaArtifact, DeltaError, open_artifact


def calibration_texts(path: str | Path, limit: int) -> list[str]:
    """Texts from JSONL lines holding "text", or "prompt" + "completion"."""
    texts = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text = row["text"] if "text" in row else row["prompt"] + row["completion"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DeltaError(f'{path}:{i}: expected {{"text"}} or {{"prompt", "completion"}}') from None
        texts.append(text)
        if len(texts) == limit:
            break
    if not texts:
        raise DeltaError(f"{path}: no calibration examples")
    return texts


def calibration_gradients(
    model_dir: str | Path,
    calib: str | Path,
    *,
    delta_artifact: str | Path | None = None,
    limit: int = 128,
    max_len: int = 256,
) -> Callable[[str], torch.Tensor | None]:
    """tensor name -> mean ∇L over the calibration texts, at `model_dir` (+ the artifact's Δ)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if delta_artifact is not None:
        _add_delta(model, open_artifact(delta_artifact))
    model.eval()  # no dropout: the gradient of the model as served
    texts = calibration_texts(calib, limit)
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_len)["input_ids"]
        loss = model(input_ids=ids, labels=ids).loss / len(texts)
        loss.backward()
    grads = {name: p.grad.detach() for name, p in model.named_parameters() if p.grad is not None}
    if "lm_head.weight" not in grads and getattr(model.config, "tie_word_embeddings", False):
        grads["lm_head.weight"] = grads.get("model.embed_tokens.weight")
    return grads.get


def _add_delta(model: torch.nn.Module, artifact: DeltaArtifact) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if artifact.has_tensor(name):
                param.add_(artifact.delta(name).full().view_as(param))
