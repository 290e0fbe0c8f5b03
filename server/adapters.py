"""The adapter lane: low-rank variants served as vLLM LoRA adapters on the resident plain base.

A variant whose deltas are all `lowrank` projection matrices (deltas.lora.adapter_rank), mixed
linearly, is one LoRA adapter: B·A = Σ αᵢ·Bᵢ·Aᵢ. vLLM applies an adapter on top of whatever
weights are resident, so adapter requests are admitted on the plain base — beside requests for
other adapters, with no swap; plain-base requests take turns with them on the same weights (a
lane of the weight slot: vLLM CPU answered plain rows differently in batches with LoRA rows),
which reloads nothing. Each adapter is written once per recipe, named
by a hash of the recipe and its files' identity (a changed delta never reuses a stale adapter),
and loaded into an engine on first use (vLLM's /v1/load_lora_adapter); after an engine restart,
again.

Numerics: LoRA adds x·Aᵀ·Bᵀ beside x·Wᵀ instead of computing x·(W + BA)ᵀ, so an adapter answer
is the offline merge's within LoRA's rounding, not bit for bit: in fp32 the same greedy tokens; in
bf16 enough to flip a near-tie (docs/concepts/lanes.md). A base whose engines cannot run LoRA
(loaders/engine.lora_refusal: mixture-of-experts models on vLLM's CPU build) has no adapter lane.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from deltas import Recipe
from deltas.lora import export_lora_mix
from loaders.engine import EngineClient, EngineError, lora_refusal
from server.registry import BaseRecord, DeltaRecord, VariantRecord

log = logging.getLogger("deltagate.adapters")


@dataclass(frozen=True)
class Adapter:
    """One variant as a LoRA adapter: the name the engine knows it by, its files, what it holds."""

    name: str
    path: Path
    terms: tuple[tuple[str, float], ...]  # (artifact path, effective alpha)


class AdapterLane:
    """Which variants are adapters, their files, and which adapters each engine has loaded."""

    def __init__(self, root: Path, slots: int, max_rank: int):
        self.root = root
        self.slots = slots
        self.max_rank = max_rank
        self._loaded: dict[str, set[str]] = defaultdict(set)  # engine id -> adapter names loaded there
        self._clients: dict[str, EngineClient] = {}  # engine id -> its client (to unload from it)
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def not_adapter(self, variant: VariantRecord, base: BaseRecord, deltas: list[DeltaRecord]) -> str | None:
        """Why `variant` is served by swaps rather than as an adapter (None: it is an adapter)."""
        if variant.lane == "swap":
            return "its lane is swap"
        return self.unfit(variant, base, deltas)

    def serving(
        self, variant: VariantRecord, base: BaseRecord, recipe: Recipe, deltas: list[DeltaRecord]
    ) -> Adapter | None:
        """The adapter `variant` is served as (None: it is served by swaps)."""
        return None if self.not_adapter(variant, base, deltas) else self.adapter(variant, recipe, deltas)

    def unfit(self, variant: VariantRecord, base: BaseRecord, deltas: list[DeltaRecord]) -> str | None:
        """Why `variant` (on `base`) cannot be served as an adapter here (None: it can)."""
        if not self.slots:
            return "this gateway has no LoRA slots (serve --lora-slots N)"
        if not deltas:
            return "the plain base needs no adapter"
        refusal = lora_refusal(base.path)
        if refusal:
            return refusal
        if variant.method != "linear":
            return f"method {variant.method!r} is not a linear mix of the deltas"
        for record in deltas:
            if record.adapter_rank is None:
                why = record.adapter_unfit or "registered before adapters existed; register it again"
                return f"delta {record.name!r}: {why}"
        rank = sum(r.adapter_rank or 0 for r in deltas)
        if rank > self.max_rank:
            return f"its rank {rank} exceeds the engines' --max-lora-rank {self.max_rank}"
        return None

    def adapter(self, variant: VariantRecord, recipe: Recipe, deltas: list[DeltaRecord]) -> Adapter:
        """The adapter for `variant` (its files may not be written yet: see prepare)."""
        alphas = [t.alpha for t in recipe.deltas]
        if variant.normalize and abs(sum(alphas)) >= 1e-8:  # as deltas.merge_methods.linear does
            alphas = [a / sum(alphas) for a in alphas]
        terms = tuple((t.path, a) for t, a in zip(recipe.deltas, alphas, strict=True))
        identity = [variant.name, recipe.key(), *[(d.size_bytes, d.mtime_ns) for d in deltas]]
        digest = hashlib.sha256(repr(identity).encode()).hexdigest()[:16]
        return Adapter(f"{variant.name}@{digest[:8]}", self.root / digest, terms)

    async def prepare(self, adapter: Adapter) -> None:
        """Write the adapter's files once (atomically: a directory renamed into place)."""
        if (adapter.path / "adapter_config.json").is_file():
            return
        async with self._locks[str(adapter.path)]:
            if (adapter.path / "adapter_config.json").is_file():
                return
            tmp = self.root / f".{adapter.path.name}-{uuid.uuid4().hex}.partial"
            try:
                rank = await asyncio.to_thread(export_lora_mix, adapter.terms, tmp)
                tmp.rename(adapter.path)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            log.info("wrote adapter %s (rank %d)", adapter.name, rank)

    async def load(self, engine_id: str, client: EngineClient, adapter: Adapter) -> None:
        """Load `adapter` into engine `engine_id` unless it already is."""
        if adapter.name in self._loaded[engine_id]:
            return
        async with self._locks[engine_id]:
            if adapter.name not in self._loaded[engine_id]:
                await client.load_adapter(adapter.name, str(adapter.path))
                self._loaded[engine_id].add(adapter.name)
                self._clients[engine_id] = client
                log.info("loaded adapter %s into engine %s", adapter.name, engine_id)

    async def unload(self, adapter: Adapter) -> None:
        """Unload `adapter` from every engine that loaded it and delete its files (an engine that
        cannot be reached forgets it when it restarts)."""
        for engine_id, names in self._loaded.items():
            if adapter.name in names:
                names.discard(adapter.name)
                try:
                    await self._clients[engine_id].unload_adapter(adapter.name)
                except EngineError:
                    log.warning(
                        "could not unload %s from engine %s; it forgets it on restart",
                        adapter.name,
                        engine_id,
                    )
        shutil.rmtree(adapter.path, ignore_errors=True)

    def forget(self, engine_id: str) -> None:
        """Engine `engine_id` restarted: it has no adapters loaded."""
        self._loaded.pop(engine_id, None)
        self._clients.pop(engine_id, None)

    def loaded(self, engine_id: str) -> list[str]:
        return sorted(self._loaded.get(engine_id, ()))
