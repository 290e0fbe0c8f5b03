"""What swaps read, kept in the engine worker's memory: base tensors and decoded deltas.

Without it every swap re-reads the base checkpoint and re-decodes every delta tensor. With it a
swap reads base tensors from memory — host memory (pinned on a GPU engine, so copies to the device
run at full PCIe speed) or the device itself when the memory is there for it — and decoded deltas
from an LRU cache with a byte budget. Pure torch: no vLLM here.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from deltas.mix import Delta
from deltas.store import file_identity
from loaders.merge import CheckpointSource

Residency = Literal["host", "device", "none"]


RESIDENCY_ENV, DELTA_CACHE_ENV, SWAP_MODE_ENV, PREPARE_ENV = (
    "DELTAGATE_SWAP_RESIDENCY",
    "DELTAGATE_DELTA_CACHE_MIB",
    "DELTAGATE_SWAP_MODE",
    "DELTAGATE_PREPARE_MIB",
)


@dataclass(frozen=True)
class ResidencyConfig:
    """How an engine's workers keep what swaps need: where base tensors stay between swaps, how many
    bytes of decoded deltas are cached, and whether a swap rewrites only what changed. The gateway
    sets it (GatewaySettings.engine_env: `to_env`), the workers read it (`from_env`); the defaults
    here are the settings' defaults."""

    residency: Residency = "host"
    delta_cache_bytes: int = 1 << 30
    max_bases: int = 2  # the start-up base and one hot-loaded base, say
    full_swaps: bool = False  # every tensor merged inside the pause (benchmarks' baseline)
    prepare_bytes: int = 4 << 30  # kernel-form copies a stage may hold (loaders/prepared.py); 0: off

    @classmethod
    def from_env(cls) -> ResidencyConfig:
        """The config the gateway gave this engine in its environment."""
        default = cls()
        residency = os.environ.get(RESIDENCY_ENV, default.residency)
        if residency not in ("host", "device", "none"):
            raise ValueError(f"{RESIDENCY_ENV}={residency!r}: use host, device or none")
        mib = float(os.environ.get(DELTA_CACHE_ENV, default.delta_cache_bytes / (1 << 20)))
        full = os.environ.get(SWAP_MODE_ENV, "incremental") == "full"
        prepare = float(os.environ.get(PREPARE_ENV, default.prepare_bytes / (1 << 20)))
        return cls(residency, int(mib * (1 << 20)), full_swaps=full, prepare_bytes=int(prepare * (1 << 20)))

    def to_env(self) -> dict[str, str]:
        """This config as an engine's environment."""
        return {
            RESIDENCY_ENV: self.residency,
            DELTA_CACHE_ENV: str(self.delta_cache_bytes / (1 << 20)),
            SWAP_MODE_ENV: "full" if self.full_swaps else "incremental",
            PREPARE_ENV: str(self.prepare_bytes / (1 << 20)),
        }


class ResidentWeights(CheckpointSource):
    """A CheckpointSource that keeps base tensors and decoded deltas in memory, merging on `device`."""

    def __init__(self, device: torch.device, config: ResidencyConfig = ResidencyConfig()):
        super().__init__()
        self.device = device
        self.config = config
        self._bases: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._deltas: OrderedDict[tuple, Delta] = OrderedDict()
        self._delta_bytes = 0
        self._pinned: set[str] = set()  # delta paths whose decoded tensors are never evicted
        self.evicted: deque[str] = deque(maxlen=16)  # the delta files last evicted (names), newest last
        self.hits = self.misses = 0
        self._lock = threading.RLock()  # a warm-up thread reads beside the stage and the commit

    def base_tensor(self, path: str, name: str) -> torch.Tensor:
        if self.config.residency == "none":
            return super().base_tensor(path, name)
        with self._lock:
            tensors = self._bases.get(path)
            if tensors is None:
                tensors = self._load_base(path)
            self._bases.move_to_end(path)
            return tensors[name]

    def _load_base(self, path: str) -> dict[str, torch.Tensor]:
        """Read a base once, into memory that outlives the file's mmap (evicting the oldest base)."""
        while len(self._bases) >= self.config.max_bases:
            self._bases.popitem(last=False)
        on_device = self.config.residency == "device"
        pin = not on_device and self.device.type == "cuda"
        tensors = {}
        for name, tensor in self.checkpoint(path).iter_tensors():
            if on_device:
                tensors[name] = tensor.to(self.device)
            else:
                tensors[name] = tensor.pin_memory() if pin else tensor.clone()
        self._bases[path] = tensors
        return tensors

    def delta(self, path: str, name: str, device: torch.device) -> Delta:
        with self._lock:
            return self._delta(path, name, device)

    def _delta(self, path: str, name: str, device: torch.device) -> Delta:
        key = (path, *file_identity(path), name, str(device))  # a file replaced under the path: another delta
        cached = self._deltas.get(key)
        if cached is not None:
            self.hits += 1
            self._deltas.move_to_end(key)
            return cached
        self.misses += 1
        delta = super().delta(path, name, device)
        if path in self._pinned or delta.nbytes <= self.config.delta_cache_bytes:
            self._deltas[key] = delta
            self._delta_bytes += delta.nbytes
            self._evict()
        return delta

    def _evict(self) -> None:
        """Drop the least recently used unpinned deltas until the cache is within its budget (pinned
        ones may hold more than the budget on their own: then nothing unpinned stays)."""
        for key in [k for k in self._deltas if k[0] not in self._pinned]:
            if self._delta_bytes <= self.config.delta_cache_bytes:
                return
            self._delta_bytes -= self._deltas.pop(key).nbytes
            if not self.evicted or self.evicted[-1] != Path(key[0]).name:
                self.evicted.append(Path(key[0]).name)

    def pin(self, paths: set[str], pinned: bool) -> None:
        """Keep (or stop keeping) these delta files' decoded tensors whatever the budget."""
        with self._lock:
            self._pinned = self._pinned | paths if pinned else self._pinned - paths
            self._evict()

    def memory(self) -> dict:
        """Bytes held, for /v1/bases and the swap log."""
        base_bytes = sum(t.numel() * t.element_size() for ts in self._bases.values() for t in ts.values())
        placement = self.config.residency
        if placement == "host" and self.device.type == "cuda":
            placement = "pinned host"
        return {
            "residency": placement,
            "base_bytes": base_bytes,
            "bases": len(self._bases),
            "delta_cache_bytes": self._delta_bytes,
            "delta_cache_budget_bytes": self.config.delta_cache_bytes,
            "delta_cache_hits": self.hits,
            "delta_cache_misses": self.misses,
            "pinned": sorted(Path(p).name for p in self._pinned),
            "pinned_bytes": sum(d.nbytes for k, d in self._deltas.items() if k[0] in self._pinned),
            "evicted": list(self.evicted),
        }
