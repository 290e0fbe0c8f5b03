"""A swap in two steps: stage (merge what changes, in a background thread, while the engine serves),
then commit (the engine paused: hand the staged tensors to its reload).

What changes from recipe A to recipe B: a tensor's merged value depends only on the base and on
the delta terms that cover it, so only tensors whose covering terms differ between A and B are
rewritten — widened to whole engine modules, because vLLM's layerwise reload processes a fused
module (qkv_proj, gate_up_proj) that received only part of its checkpoint tensors as partially
loaded, and leaves a module that received none as it was. Pure torch: the vLLM side (which tensors
form a module, the reload itself) comes in as arguments from loaders/worker_extension.py.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from deltas import Recipe
from deltas.store import file_identity
from loaders.merge import CheckpointSource, merged_tensors, read_inputs
from loaders.resident import ResidentWeights
from loaders.shards import Shard

log = logging.getLogger("vllm.deltagate.staging")  # inside an engine: in its log, as vLLM's own lines

Tensors = list[tuple[str, torch.Tensor]]
Reload = Callable[[Tensors], None]
# Tensors -> their modules loaded and processed off the live model (loaders/prepared.PreparedCommit)
Prepare = Callable[[Tensors], object]


def module_groups(names: Iterable[str], packed: dict[str, list[str]]) -> dict[str, str]:
    """Checkpoint tensor name -> the engine module it loads into (`packed`: the model's
    packed_modules_mapping, e.g. {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}). Every expert's
    tensors (`...experts.3.w1.weight`, `...experts.3.gate_proj.weight`) load into one fused-experts
    module (`...experts`: w13/w2 of all experts), so a swap sends all of them or none."""
    fused = {part: whole for whole, parts in packed.items() for part in parts}

    def module(name: str) -> str:
        parts = name.split(".")[:-1]
        for i, part in enumerate(parts[:-1]):
            if part == "experts" and parts[i + 1].isdigit():
                return ".".join(parts[: i + 1])
        return ".".join(fused.get(p, p) for p in parts)

    return {name: module(name) for name in names}


def tensor_identity(recipe: Recipe, terms: list[tuple]) -> tuple:
    """What a tensor's merged value depends on: the base, the method and the terms covering it (each
    term's path, file identity, alpha and density)."""
    if not terms:
        return (os.path.realpath(recipe.base),)
    return (os.path.realpath(recipe.base), recipe.method, recipe.normalize, recipe.seed, tuple(terms))


@dataclass
class _Stage:
    """Tensors being (or already) merged for a swap from `source_key` to `target_key`."""

    source_key: str | None
    target_key: str
    cancel: threading.Event = field(default_factory=threading.Event)
    tensors: Tensors = field(default_factory=list)
    seconds: float = 0.0
    error: BaseException | None = None
    thread: threading.Thread | None = None
    prepared: object | None = None  # a PreparedCommit, when the swapper prepares
    restores: tuple[int, int] | None = None  # a kept commit back: the (tensors, bytes) it puts back

    def serves(self, source_key: str | None, target: Recipe) -> bool:
        """Whether this stage is for the swap from `source_key` to `target`."""
        return self.source_key == source_key and self.target_key == target.key()


class Swapper:
    """The weights resident on one worker, and the swaps that change them."""

    def __init__(
        self,
        resident: Recipe | None,
        names: list[str],
        groups: dict[str, str],
        source: CheckpointSource,
        *,
        incremental: bool = True,
        shards: dict[str, Shard] | None = None,
        prepare: Prepare | None = None,
    ):
        self.resident = resident  # None: unknown (a failed reload), so the next swap rewrites all
        self.names = names  # the base checkpoint's tensors, in checkpoint order
        self.groups = groups
        self.source = source
        self.incremental = incremental  # False: rewrite every tensor, every swap (the pre-staging design)
        self.shards = shards or {}  # this tensor-parallel rank's slices: merged only there
        self.prepare = prepare  # None: every commit hands its tensors to the reload
        # merge outputs reused from swap to swap (the engine copies what it is given), unless memory is
        # what the user saves (residency none)
        keep = isinstance(source, ResidentWeights) and source.config.residency != "none"
        self._buffers: dict[str, torch.Tensor] | None = {} if keep else None
        self._stage: _Stage | None = None
        self._retired: list = []  # what the last commit replaced, freed by release() once the engine runs
        # the last commit's way back (a prepared commit of the weights it replaced), while it holds
        self._reverse: _Stage | None = None
        self._warming: tuple | None = None  # (recipe key, thread) of the last warm-up

    # what changes ----------------------------------------------------
    def plan(self, target: Recipe, resident: Recipe | None = None) -> list[str]:
        """The tensors a swap from the resident recipe (or `resident`) to `target` rewrites, in
        checkpoint order."""
        resident = resident or self.resident
        if not self.incremental or resident is None:
            return list(self.names)
        old, new = self._identities(resident), self._identities(target)
        changed = {self.groups[n] for n in self.names if old[n] != new[n]}
        return [n for n in self.names if self.groups[n] in changed]

    def _identities(self, recipe: Recipe) -> dict[str, tuple]:
        artifacts = [self.source.artifact(t.path) for t in recipe.deltas]
        # one stat per term, not per tensor and term
        terms = [(t.path, *file_identity(t.path), t.alpha, t.density) for t in recipe.deltas]
        return {
            n: tensor_identity(recipe, [terms[i] for i, a in enumerate(artifacts) if a.has_tensor(n)])
            for n in self.names
        }

    # warm ------------------------------------------------------------
    def warm(self, target: Recipe, pin: bool | None = None) -> bool:
        """Read `target`'s inputs (base tensors, decoded deltas) into the resident weights in the
        background (returns at once), so its first swap finds them; False if nothing keeps them.
        `pin`: True keeps its decoded deltas whatever the cache's budget, False stops keeping them."""
        if not isinstance(self.source, ResidentWeights) or self.source.config.residency == "none":
            return False
        if pin is not None:
            self.source.pin({t.path for t in target.deltas}, pin)

        def read() -> None:
            try:
                with torch.inference_mode():
                    read_inputs(target, self.names, self.source)
            except Exception as exc:  # a swap to it reads them again, and reports what fails
                log.warning("warming %s failed: %s", _short(target.key()), exc)

        running = self._warming
        if running is not None and running[0] == target.key() and running[1].is_alive():
            return True  # already reading it
        thread = threading.Thread(target=read, name="deltagate-warm", daemon=True)
        self._warming = (target.key(), thread)
        thread.start()
        return True

    # stage -----------------------------------------------------------
    def stage(self, target: Recipe) -> bool:
        """Start merging `target`'s changed tensors in the background (returns at once); a stage for
        another swap is abandoned. False if there is nothing to stage."""
        source_key = self.resident.key() if self.resident else None
        if not self.incremental or target.key() == source_key:
            self._drop_stage()
            return False
        current = self._stage
        if current and current.serves(source_key, target):
            return True
        self._drop_stage()
        reverse = self._reverse
        if reverse and reverse.serves(source_key, target):
            # back to the weights the last swap replaced: kept prepared; only its own way back (the
            # resident's tensors) is copied, in the background
            reverse.thread = threading.Thread(
                target=reverse.prepared.snapshot, name="deltagate-stage", daemon=True
            )
            self._stage = reverse
            reverse.thread.start()
            return True
        stage = _Stage(source_key, target.key())
        stage.thread = threading.Thread(
            target=self._merge_into, args=(stage, target), name="deltagate-stage", daemon=True
        )
        self._stage = stage
        stage.thread.start()
        return True

    def stage_ready(self) -> bool:
        """Whether the current stage has finished (merged and prepared): a commit now waits for nothing."""
        stage = self._stage
        return stage is not None and (stage.thread is None or not stage.thread.is_alive())

    def _merge_into(self, stage: _Stage, target: Recipe) -> None:
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                for item in self._merged(target):
                    if stage.cancel.is_set():
                        stage.tensors = []
                        return
                    stage.tensors.append(item)
                if self.prepare is not None and not stage.cancel.is_set():
                    stage.prepared = self.prepare(stage.tensors)
                    stage.prepared.snapshot()  # the way back, while the resident still serves
        except BaseException as exc:  # reported at commit, which then merges again itself
            stage.error = exc
        stage.seconds = time.perf_counter() - start

    def _merged(self, target: Recipe) -> Iterator[tuple[str, torch.Tensor]]:
        return merged_tensors(target, self.plan(target), self.source, self.shards, self._buffers)

    def _drop_stage(self) -> None:
        stage, self._stage = self._stage, None
        if stage is not None:
            stage.cancel.set()
            if stage.thread is not None:
                stage.thread.join()
            kept = " (the way back is kept)" if stage is self._reverse else ""
            log.info("abandoned the staged swap to %s%s", _short(stage.target_key), kept)

    # commit ----------------------------------------------------------
    def commit(self, target: Recipe, reload: Reload) -> dict:
        """Rewrite the resident weights to `target` through `reload`, from the stage if there is one
        for this swap; what was done, for the gateway's swap record."""
        start = time.perf_counter()
        self.release()  # a previous commit's leftovers, if nobody released them (here: in the pause)
        stage, self._stage = self._stage, None
        source_key = self.resident.key() if self.resident else None
        staged = stage is not None and stage.serves(source_key, target)
        if stage is not None and not staged:
            self._stage = stage
            self._drop_stage()
        reverse = self._reverse
        if not staged and reverse and reverse.serves(source_key, target):
            stage, staged = reverse, True  # back to the weights the last swap replaced, kept prepared
        waited = 0.0
        if staged and stage.thread is not None:
            wait_start = time.perf_counter()
            stage.thread.join()
            waited = time.perf_counter() - wait_start
            if stage.error is not None:
                log.warning("staging the swap failed (%s); merging it now", stage.error)
                staged = False
        prepared = stage.prepared if staged else None
        if staged:
            tensors = stage.tensors
        else:
            with torch.inference_mode():
                tensors = list(self._merged(target))
        merged_at = time.perf_counter()
        if prepared is None and self.prepare is not None and tensors:  # not staged: prepared in the pause
            prepared = self.prepare(tensors)
        prepared_at = time.perf_counter()
        self.resident = None  # until the reload has finished: a failure leaves the weights unknown
        rest = tensors
        if prepared is not None:
            with torch.inference_mode():
                prepared.commit()
            rest = prepared.fallback
        if rest:
            reload(rest)
        self.resident = target
        count, nbytes = (
            stage.restores
            if staged and stage.restores
            else (len(tensors), sum(t.numel() * t.element_size() for _, t in tensors))
        )
        self._retired = [stage, prepared, tensors, self._reverse]
        self._reverse = None
        back = getattr(prepared, "reverse", None)
        if back is not None and not rest and source_key is not None:
            self._reverse = _Stage(target.key(), source_key, prepared=back, restores=(count, nbytes))
        end = time.perf_counter()
        return {
            "tensors": count,
            "of_tensors": len(self.names),
            "bytes": nbytes,
            "sharded": sum(name in self.shards for name, _ in tensors),  # merged on this rank's slice only
            "seconds": end - start,
            "merge_seconds": merged_at - start,
            "prepare_seconds": prepared_at - merged_at,  # 0 when staged: prepared while serving
            "reload_seconds": end - prepared_at,  # the commit: re-binding the prepared, reloading the rest
            **_prepared_report(prepared),
            "staged": staged,
            "staging_seconds": stage.seconds if staged else 0.0,
            "staging_wait_seconds": waited,
            "memory": self.memory(),
        }

    def release(self) -> float:
        """Free what the last commit replaced (old kernel handles, shadows, staged tensors): called
        once the engine runs again, since freeing them takes longer than the commit. Seconds taken."""
        start = time.perf_counter()
        self._retired = []
        return time.perf_counter() - start

    def memory(self) -> dict:
        """Bytes held by the resident weights and the stage."""
        report = self.source.memory() if isinstance(self.source, ResidentWeights) else {"residency": "none"}
        stage = self._stage
        report["staged_bytes"] = sum(t.numel() * t.element_size() for _, t in stage.tensors) if stage else 0
        report["buffer_bytes"] = sum(t.numel() * t.element_size() for t in (self._buffers or {}).values())
        reverse = self._reverse
        report["kept_prepared_bytes"] = reverse.prepared.bytes if reverse else 0  # the way back
        return report


def _prepared_report(prepared) -> dict:
    """A commit's account of its prepared modules and of those vLLM's reload rewrote."""
    if prepared is None:
        return {"prepared_modules": 0, "fallback_modules": 0, "prepared_bytes": 0}
    return {
        "prepared_modules": len(prepared.prepared_modules),  # empty when nothing was prepared
        "fallback_modules": len(prepared.fallback_modules),
        "prepared_bytes": prepared.bytes,
        "fallback_reason": prepared.reason,
    }


def _short(key: str) -> str:
    return key if len(key) < 120 else key[:117] + "..."
