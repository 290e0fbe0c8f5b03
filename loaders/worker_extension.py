"""The vLLM worker extension: rewrite resident weights in place to a recipe's weights.

Handed to vLLM as ``--worker-extension-cls loaders.worker_extension.DeltaWorkerExtension``
and reached through ``collective_rpc``. vLLM mixes this class into its Worker, so
``self`` is the worker. What a swap rewrites, staging and the merge live in loaders.staging,
loaders.resident and loaders.merge (pure, tested without vLLM); this class adds what only the
engine knows: its modules, its device and its reload.
"""

from __future__ import annotations

import functools
import logging
import statistics
import time

import torch

from deltas import Recipe
from loaders.merge import CheckpointSource
from loaders.prepared import prepare as prepare_commit
from loaders.resident import ResidencyConfig, ResidentWeights
from loaders.shards import rank_shards
from loaders.staging import Swapper, Tensors, module_groups


class DeltaWorkerExtension:
    """RPC methods the gateway calls on every worker of an engine."""

    def deltagate_stage(self, recipe_json: str) -> dict:
        """Start merging `recipe_json`'s changed tensors in the background while the engine serves."""
        swapper = self._deltagate_swapper()
        swapper.release()  # the last swap's leftovers, if its caller did not release them
        staging = swapper.stage(Recipe.model_validate_json(recipe_json))
        return {"staging": staging, "ready": staging and swapper.stage_ready()}

    def deltagate_release(self) -> dict:
        """Free what the last swap replaced (called after the engine resumed: loaders/engine_swap.py)."""
        return {"release_seconds": self._deltagate_swapper().release()}

    def deltagate_warm(self, recipe_json: str, pin: str = "") -> dict:
        """Read `recipe_json`'s base tensors and decoded deltas into memory in the background; `pin`
        "true" keeps its deltas whatever the cache's budget, "false" stops keeping them."""
        swapper = self._deltagate_swapper()
        pinned = {"true": True, "false": False}.get(pin)
        warming = swapper.warm(Recipe.model_validate_json(recipe_json), pinned)
        return {"warming": warming, "memory": swapper.memory()}

    def deltagate_apply(self, recipe_json: str) -> dict:
        """Rewrite the model's weights to `recipe_json` (a Recipe) in place: only what changes, from
        the staged tensors when a stage for this swap exists."""
        recipe = Recipe.model_validate_json(recipe_json)
        swapper = self._deltagate_swapper()
        repaired: list[str] = []

        def reload(tensors: Tensors) -> None:
            model = self.model_runner.get_model()
            sent = {swapper.groups[name] for name, _ in tensors}
            partial = len(tensors) < len(swapper.names)
            with torch.inference_mode(), _quiet_partial_reload(partial), _expert_kernels_prepared(model):
                self.model_runner.reload_weights(weights_iterator=iter(tensors))
                repaired.extend(reprocess_tied_modules(model, only=sent))

        result = swapper.commit(recipe, reload)
        if result.get("prepared_modules"):
            self._deltagate_weights_replaced()
        self._deltagate_recipe = recipe_json
        return {**result, "repaired": repaired}

    def _deltagate_weights_replaced(self) -> None:
        """What vLLM's reload_weights invalidates after replacing weights, after a prepared commit."""
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
            getattr(self.model_runner, reset, lambda: None)()

    def deltagate_floors(self, recipe_json: str, repeats: int = 3) -> dict:
        """The memory floors of a swap from the base to `recipe_json`, measured here (bench/swap.py): a
        copy and an add of the base tensors that swap rewrites, into preallocated tensors, medians."""
        recipe = Recipe.model_validate_json(recipe_json)
        swapper = self._deltagate_swapper()
        names = swapper.plan(recipe, resident=Recipe(base=recipe.base))
        tensors = [swapper.source.base_tensor(recipe.base, n).to(swapper.source.device) for n in names]
        outs = [torch.empty_like(t) for t in tensors]

        def timed(step) -> float:
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                for out, t in zip(outs, tensors, strict=True):
                    step(out, t)
                if swapper.source.device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            return statistics.median(times)

        return {
            "tensors": len(names),
            "bytes": sum(t.numel() * t.element_size() for t in tensors),
            "copy_seconds": timed(lambda out, t: out.copy_(t)),
            "add_seconds": timed(lambda out, t: torch.add(t, t, out=out)),
            "threads": torch.get_num_threads(),
        }

    def deltagate_recipe(self) -> str | None:
        """The recipe last applied on this worker (None: weights as loaded at start)."""
        return getattr(self, "_deltagate_recipe", None)

    def _deltagate_swapper(self) -> Swapper:
        swapper = getattr(self, "_deltagate_swapper_", None)
        if swapper is None:
            start_model = self.model_runner.vllm_config.model_config.model
            model = self.model_runner.get_model()
            source = CheckpointSource()
            names = source.checkpoint(start_model).tensor_names()
            packed = getattr(model, "packed_modules_mapping", None) or {}
            groups = module_groups(names, packed)
            config = ResidencyConfig.from_env()  # what the gateway set (GatewaySettings.engine_env)
            full = config.full_swaps
            shards = {}
            if not full:
                source = ResidentWeights(_device_of(self), config)
                shards = rank_shards(model, names, packed)
            prepare = None
            if not full and config.prepare_bytes > 0:
                prepare = functools.partial(prepare_commit, model, groups=groups, budget=config.prepare_bytes)
            swapper = Swapper(
                Recipe(base=start_model),
                names,
                groups,
                source,
                incremental=not full,
                shards=shards,
                prepare=prepare,
            )
            if self.deltagate_recipe() is not None:  # a worker that applied before this code ran
                swapper.resident = None
            self._deltagate_swapper_ = swapper
        return swapper


def _device_of(worker) -> torch.device:
    device = getattr(worker, "device", None)
    return torch.device(device) if device is not None else torch.device("cpu")


class _PartialReloadFilter(logging.Filter):
    """Drops vLLM's per-module warnings for modules a partial reload leaves as they were on purpose."""

    active = False
    MESSAGES = ("Failed to load weights", "Following weights were not loaded")

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self.active and any(m in str(record.msg) for m in self.MESSAGES))


_FILTER = _PartialReloadFilter()
for _name in ("layerwise", "inplace"):
    logging.getLogger(f"vllm.model_executor.model_loader.reload.{_name}").addFilter(_FILTER)


class _quiet_partial_reload:
    def __init__(self, partial: bool):
        self.partial = partial

    def __enter__(self) -> None:
        _FILTER.active = self.partial

    def __exit__(self, *exc) -> None:
        _FILTER.active = False


class _expert_kernels_prepared:
    """Around a reload: prepare each MoE layer's expert kernel again after its weights' processing.

    vLLM 0.32's unquantized MoE method runs its expert kernel's own preparation only at the first
    load (`moe_kernel.fused_experts.process_weights_after_loading`: on the CPU build, the prepack
    into its grouped-gemm layout). On a weight update it copies the new weights in unpacked, and
    the reload copies them into the packed tensors: the kernel reads them as packed. Seen on tiny
    Mixtral and Qwen3-MoE models (issue 36; the model matrix fails without it): their variants
    answered 0 of 3 prompts as stock vLLM on the merged weights, every tensor rewritten. The base
    class's step is a no-op (most GPU kernels).
    """

    def __init__(self, model: torch.nn.Module):
        self.methods = [
            m
            for m in (getattr(module, "quant_method", None) for module in model.modules())
            if getattr(getattr(m, "moe_kernel", None), "fused_experts", None) is not None
        ]

    def __enter__(self) -> None:
        for method in self.methods:
            processed = method.process_weights_after_loading  # the class's, bound

            def process(layer, processed=processed, method=method) -> None:
                processed(layer)
                method.moe_kernel.fused_experts.process_weights_after_loading(layer)

            method.process_weights_after_loading = process  # this instance only, for this reload

    def __exit__(self, *exc) -> None:
        for method in self.methods:
            method.__dict__.pop("process_weights_after_loading", None)


def _within(module: str, groups: set[str]) -> bool:
    """Whether `module` is one of `groups` or inside one (a LoRA wrapper's base_layer)."""
    return any(module == g or module.startswith(g + ".") for g in groups)


def reprocess_tied_modules(model: torch.nn.Module, only: set[str] | None = None) -> list[str]:
    """Re-run post-load processing of modules whose weight is shared with another module
    (with `only`: of tied groups one of whose modules is in `only`, i.e. was reloaded).

    In-place reload processes each layer whose weights it received. A tied lm_head
    receives none (the checkpoint has only embed_tokens), so on backends that repack
    weights after loading (vLLM CPU) it would keep the packed copy of the OLD embedding.
    """
    owners: dict[int, list[tuple[str, torch.nn.Module]]] = {}
    for name, module in model.named_modules():
        weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if weight is not None:
            owners.setdefault(id(weight), []).append((name, module))
    repaired = []
    for modules in owners.values():
        if len(modules) < 2 or (only is not None and not any(_within(name, only) for name, _ in modules)):
            continue
        for name, module in modules:
            method = getattr(module, "quant_method", None)
            if method is not None and hasattr(method, "process_weights_after_loading"):
                method.process_weights_after_loading(module)
                repaired.append(name)
    return repaired
