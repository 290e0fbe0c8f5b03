"""The vLLM worker extension: rewrite resident weights in place to a recipe's weights.

Handed to vLLM as ``--worker-extension-cls loaders.worker_extension.DeltaWorkerExtension``
and reached through ``collective_rpc``. vLLM mixes this class into its Worker, so
``self`` is the worker. The arithmetic lives in loaders.merge (pure, tested without vLLM).
"""

from __future__ import annotations

import time

import torch

from deltas.recipe import Recipe
from loaders.merge import merged_tensors


class DeltaWorkerExtension:
    """RPC methods the gateway calls on every worker of an engine."""

    def deltagate_apply(self, recipe_json: str) -> dict:
        """Reload the model's weights from `recipe_json` (a Recipe) in place."""
        recipe = Recipe.model_validate_json(recipe_json)
        start = time.perf_counter()
        model = self.model_runner.get_model()
        count = 0

        def counted():
            nonlocal count
            for item in merged_tensors(recipe):
                count += 1
                yield item

        with torch.inference_mode():
            self.model_runner.reload_weights(weights_iterator=counted())
            repaired = reprocess_tied_modules(model)
        self._deltagate_recipe = recipe_json
        return {"tensors": count, "seconds": time.perf_counter() - start, "repaired": repaired}

    def deltagate_recipe(self) -> str | None:
        """The recipe last applied on this worker (None: weights as loaded at start)."""
        return getattr(self, "_deltagate_recipe", None)


def reprocess_tied_modules(model: torch.nn.Module) -> list[str]:
    """Re-run post-load processing of modules whose weight is shared with another module.

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
        if len(modules) < 2:
            continue
        for name, module in modules:
            method = getattr(module, "quant_method", None)
            if method is not None and hasattr(method, "process_weights_after_loading"):
                method.process_weights_after_loading(module)
                repaired.append(name)
    return repaired
