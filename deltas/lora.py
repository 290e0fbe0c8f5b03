"""Export a delta's projection matrices as a PEFT LoRA adapter that vLLM's multi-LoRA loads.

Each exported weight W gets lora_B @ lora_A = its low-rank delta (the `lowrank` codec's
factors, or a truncated SVD of any other encoding), with lora_alpha = r so the scale is 1.
vLLM applies LoRA to linear projections only; embedding, lm_head and norm deltas cannot
be part of the adapter and are reported, with their share of ‖Δ‖², as left out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from deltas.artifact import DeltaArtifact
from deltas.codecs import TensorSource
from deltas.codecs.lowrank import LowRankCodec, LowRankParams
from deltas.errors import DeltaError
from deltas.stream_writer import StreamingSafetensorsWriter

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraExport:
    path: Path
    rank: int
    modules: list[str]
    left_out: list[str]
    left_out_energy: float  # share of Σ‖Δ‖² in tensors the adapter cannot carry


def export_lora(artifact_path: str | Path, out_dir: str | Path, *, rank: int | None = None) -> LoraExport:
    """Write `out_dir`/adapter_config.json + adapter_model.safetensors from a delta artifact."""
    art = DeltaArtifact(artifact_path)
    factors, left_out, energy, dropped = {}, [], 0.0, 0.0
    for entry in art.manifest.tensors:
        energy += entry.delta_l2**2
        module = entry.name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] not in TARGETS or not entry.name.endswith(".weight"):
            left_out.append(entry.name)
            dropped += entry.delta_l2**2
            continue
        factors[module] = _factors(art, entry.name, entry.encoding, rank)
    if not factors:
        raise DeltaError(f"{artifact_path}: no projection matrices ({', '.join(TARGETS)}) to export")
    r = max(up.shape[1] for up, _ in factors.values())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writer = StreamingSafetensorsWriter(out / "adapter_model.safetensors")
    try:
        for module, (up, down) in factors.items():
            pad = r - up.shape[1]  # PEFT has one rank per adapter; zero columns change nothing
            writer.add(
                f"base_model.model.{module}.lora_A.weight", torch.nn.functional.pad(down, (0, 0, 0, pad))
            )
            writer.add(f"base_model.model.{module}.lora_B.weight", torch.nn.functional.pad(up, (0, pad)))
        writer.finish({"format": "pt"})
    except BaseException:
        writer.abort()
        raise
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": art.manifest.base.source,
        "r": r,
        "lora_alpha": r,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "modules_to_save": None,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in factors}),
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return LoraExport(out, r, sorted(factors), left_out, dropped / energy if energy else 0.0)


def _factors(
    art: DeltaArtifact, name: str, encoding: str, rank: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) in fp32: the stored lowrank factors, or an SVD of rank `rank`."""
    if encoding == "lowrank":
        payload = art.payload(name)
        return payload["::up"].float(), payload["::down"].float()
    if rank is None:
        raise DeltaError(f"tensor {name!r} is {encoding}, not lowrank: pass --rank to factor it")
    encoded = LowRankCodec(LowRankParams(rank=rank)).encode(TensorSource(name, art.delta(name).full()))
    return encoded.payload["::up"].float(), encoded.payload["::down"].float()
