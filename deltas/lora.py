"""Export a delta's projection matrices as a PEFT LoRA adapter that vLLM's multi-LoRA loads.

Each exported weight W gets lora_B @ lora_A = its low-rank delta (the `lowrank` codec's
factors, or a truncated SVD of any other encoding), with lora_alpha = r so the scale is 1.
vLLM applies LoRA to linear projections only; embedding, lm_head and norm deltas cannot
be part of the adapter and are reported, with their share of ‖Δ‖², as left out.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from deltas.artifact import DeltaArtifact
from deltas.codecs import TensorSource
from deltas.codecs.lowrank import LowRankCodec, LowRankParams
from deltas.errors import DeltaError
from deltas.manifest import DeltaManifest
from deltas.stream_writer import StreamingSafetensorsWriter

TARGETS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "qkv_proj",
    "gate_up_proj",
)


@dataclass(frozen=True)
class LoraExport:
    path: Path
    rank: int
    modules: list[str]
    left_out: list[str]
    left_out_energy: float  # share of Σ‖Δ‖² in tensors the adapter cannot carry


def adapter_rank(manifest: DeltaManifest) -> int:
    """The LoRA rank this delta needs as an adapter, exactly; DeltaError saying why it cannot be one.

    An adapter carries a delta exactly only if every tensor is a `lowrank` projection matrix:
    anything else (a dense tensor, an embedding, a norm) would be approximated or dropped.
    """
    rank = 0
    for entry in manifest.tensors:
        if not _is_target(entry.name):
            raise DeltaError(f"tensor {entry.name!r} is not a projection matrix ({', '.join(TARGETS)})")
        if entry.encoding != "lowrank":
            raise DeltaError(f"tensor {entry.name!r} is {entry.encoding}, not lowrank")
        rank = max(rank, min(int(entry.params.get("rank", 32)), *entry.shape))
    if not rank:
        raise DeltaError("the delta has no tensors")
    return rank


def export_lora(artifact_path: str | Path, out_dir: str | Path, *, rank: int | None = None) -> LoraExport:
    """Write `out_dir`/adapter_config.json + adapter_model.safetensors from a delta artifact."""
    art = DeltaArtifact(artifact_path)
    factors, left_out, energy, dropped = {}, [], 0.0, 0.0
    for entry in art.manifest.tensors:
        energy += entry.delta_l2**2
        if not _is_target(entry.name):
            left_out.append(entry.name)
            dropped += entry.delta_l2**2
            continue
        factors[entry.name.removesuffix(".weight")] = _factors(art, entry.name, entry.encoding, rank)
    if not factors:
        raise DeltaError(f"{artifact_path}: no projection matrices ({', '.join(TARGETS)}) to export")
    r = _write_adapter(factors, Path(out_dir), art.manifest.base.source)
    return LoraExport(Path(out_dir), r, sorted(factors), left_out, dropped / energy if energy else 0.0)


def export_lora_mix(terms: Sequence[tuple[str | Path, float]], out_dir: str | Path) -> int:
    """One adapter for Σ alpha·Δ over lowrank deltas (linear mix): B = [α₁B₁ α₂B₂ …], A = [A₁; A₂; …].

    Exact: B·A = Σ αᵢ·Bᵢ·Aᵢ, so the ranks add up. Returns the adapter's rank.
    """
    factors: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    source = ""
    for path, alpha in terms:
        art = DeltaArtifact(path)
        adapter_rank(art.manifest)  # refuses anything an adapter would not carry exactly
        source = source or art.manifest.base.source
        for entry in art.manifest.tensors:
            up, down = _factors(art, entry.name, entry.encoding, None)
            ups, downs = factors.setdefault(entry.name.removesuffix(".weight"), ([], []))
            ups.append(up * alpha)
            downs.append(down)
    if not factors:
        raise DeltaError("no deltas to export")
    merged = {m: (torch.cat(ups, dim=1), torch.cat(downs, dim=0)) for m, (ups, downs) in factors.items()}
    return _write_adapter(merged, Path(out_dir), source)


def _is_target(name: str) -> bool:
    return name.endswith(".weight") and name.removesuffix(".weight").rsplit(".", 1)[-1] in TARGETS


def _write_adapter(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], out: Path, source: str) -> int:
    """adapter_model.safetensors + adapter_config.json (PEFT's layout) for {module: (up, down)}."""
    r = max(up.shape[1] for up, _ in factors.values())
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
        "base_model_name_or_path": source,
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
    return r


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
