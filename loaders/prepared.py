"""Prepared commits: a swap's changed modules loaded and processed into kernel form off the live model.

vLLM's in-place reload (what a commit ran before) restores every layer to checkpoint form, loads the
tensors it is given and re-runs each layer's post-load processing, all inside the engine's pause: on
the CPU build that processing re-packs every linear weight into a oneDNN handle, 15x the cost of
adding the delta. Here the same steps run on *shadow* copies of the changed modules while the engine
serves (the stage): a shadow shares the live module's attributes but owns fresh tensors restored
from vLLM's reload metadata; the model's own `load_weights` fills them (through a shadow of the
module tree, so checkpoint names route exactly as in a reload) and the layer's own quant method
processes them. The commit then only copies the shadows' tensors into the live ones (same storage:
a compiled graph or a CUDA graph that captured them stays valid) and re-binds what processing built
anew. On the CPU build that is `cpu_linear`, whose closure holds the oneDNN handle: the compiled
graph reads the handle through the layer's `cpu_linear.__closure__` on every call, which is also why
vLLM's own reload, which re-binds it the same way, takes effect. The old handles go with the old
closures at the commit; nothing runs on them then, since a commit runs between engine steps and
the gateway admits no request on new weights before it.

Prepared: modules without post-load processing (norms, biases, embeddings' plain weights) and
unquantized linear and embedding layers (PREPARED_METHODS). Everything else — fused MoE experts,
quantized layers (online quantization included), attention layers, a module the checkpoint's names
do not resolve to — falls back to vLLM's reload for that module, in the same pause, and the swap's
record counts it. A stage whose shadows would hold more than the byte budget prepares nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

log = logging.getLogger("vllm.deltagate.prepared")

Tensors = list[tuple[str, torch.Tensor]]

# Quant methods whose processing depends only on the layer's own tensors, so it can run on a shadow.
PREPARED_METHODS = ("UnquantizedLinearMethod", "UnquantizedEmbeddingMethod")
_MODULE_DICTS = ("_parameters", "_buffers", "_modules")


@dataclass
class PreparedCommit:
    """Shadows of the changed modules, processed; the tensors whose modules fall back to a reload."""

    pairs: list[tuple[torch.nn.Module, torch.nn.Module]] = field(default_factory=list)  # (live, shadow)
    fallback: Tensors = field(default_factory=list)
    fallback_modules: list[str] = field(default_factory=list)
    prepared_modules: list[str] = field(default_factory=list)
    bytes: int = 0  # held by the shadows' tensors before processing (the kernel form is about as large)
    reason: str = ""  # why nothing was prepared, if so
    # after the commit: what it replaced (the old kernel handles) and the shadows, freed by the caller
    # once the engine runs again (freeing hundreds of MB is slower than the commit itself)
    replaced: list = field(default_factory=list)
    # the commit back: the live modules' current form (their bound kernels, copies of their tensors),
    # taken while they still serve it (snapshot); after this commit it is a prepared commit of the
    # weights this one replaced, so swapping back merges and prepares nothing
    reverse: PreparedCommit | None = None

    def snapshot(self) -> None:
        """Engine serving the weights this commit replaces: keep what the commit will overwrite (the
        live tensors, copied; the bound kernels, by reference) as `reverse`. Nothing when a module
        falls back to vLLM's reload (its old form is not kept)."""
        if self.fallback or not self.pairs:
            return
        copies: dict[int, torch.Tensor] = {}
        pairs = []
        for live, _ in self.pairs:
            back = _shadow(live)
            for name, tensor in _tensors(live).items():
                if id(tensor) not in copies:  # a tied weight is copied once, shared as it is live
                    copies[id(tensor)] = tensor.detach().clone()
                back._parameters[name] = copies[id(tensor)]
            pairs.append((live, back))
        # kept: the copies and the old kernels, about the size of what the commit changes
        self.reverse = PreparedCommit(
            pairs=pairs, prepared_modules=list(self.prepared_modules), bytes=self.bytes
        )

    def commit(self) -> None:
        """Engine paused: copy the shadows' tensors into the live ones, re-bind what processing built."""
        copied: set[int] = set()
        for live, shadow in self.pairs:
            live_tensors = _tensors(live)
            for name, tensor in _tensors(shadow).items():
                target = live_tensors[name]
                if target is not tensor and id(target) not in copied:  # a tied weight: once
                    target.data.copy_(tensor)
                    copied.add(id(target))
            for key, value in shadow.__dict__.items():
                if key not in _MODULE_DICTS and live.__dict__.get(key, _MISSING) is not value:
                    self.replaced.append(live.__dict__.get(key))
                    live.__dict__[key] = value
        self.replaced.append(self.pairs)
        self.pairs = []  # the shadows' handles now belong to the live modules


_MISSING = object()


def prepare(model: torch.nn.Module, tensors: Tensors, groups: dict[str, str], budget: int) -> PreparedCommit:
    """Load and process `tensors` (checkpoint name -> merged tensor) into shadows of the modules they
    belong to (`groups`: checkpoint name -> module path); a module that cannot be prepared keeps its
    tensors in `fallback`. Never writes a live tensor (checked: a write would raise)."""
    result = PreparedCommit()
    by_group: dict[str, Tensors] = {}
    for name, tensor in tensors:
        by_group.setdefault(groups[name], []).append((name, tensor))
    owners = {group: _owners(model, group) for group in by_group}
    targets = {}
    for group, items in by_group.items():
        if owners[group] is None:
            result.fallback += items
            result.fallback_modules.append(group)
        else:
            targets.update(owners[group])
            result.prepared_modules.append(group)
    if not targets:
        return result
    size = sum(_restored_bytes(m) for m in targets.values())
    if size > budget:
        over = f"its modules need {size / 2**20:.1f} MiB, over the {budget / 2**20:.3g} MiB budget"
        return _nothing_prepared(tensors, by_group, over)
    try:
        partners = _tied_partners(model, targets)
        root, shadows = _shadow_tree(model, {**targets, **partners})
        for path in targets:
            _restore(shadows[path], targets[path])
        sent = [item for group in result.prepared_modules for item in by_group[group]]
        # vLLM reloads a torchao-quantized model whole from inside its load_weights (every layer restored
        # to checkpoint form, the live ones included): the shadow root loads as a model loading once
        root.__dict__["_do_torchao_reload"] = False
        held = _held_tensors(model)
        with torch.inference_mode(), _LiveWriteGuard(model, shadows, targets) as guard:
            try:
                root.load_weights(iter(sent))
            finally:
                _check_held(model, held)
            short = [p for p in targets if guard.loaded(shadows[p]) < _load_size(shadows[p])]
            if short:
                raise _Unprepared(f"{short[0]} not fully loaded ({len(short)} modules)")
            for path, live in partners.items():
                _share_tied(shadows[path], live, targets, shadows)
            for path in [*targets, *partners]:
                _process(shadows[path])
        for path in [*targets, *partners]:
            live, shadow = model.get_submodule(path), shadows[path]
            for name, tensor in _tensors(shadow).items():
                target = _tensors(live).get(name)
                if target is None or target.shape != tensor.shape or target.dtype != tensor.dtype:
                    raise _Unprepared(f"{path}.{name} changed form in processing")
            result.pairs.append((live, shadow))
    except Exception as exc:  # the whole swap falls back: what failed is logged, nothing live was touched
        log.warning("could not prepare the swap's modules (%s): vLLM's reload will rewrite them", exc)
        return _nothing_prepared(tensors, by_group, str(exc))
    result.bytes = size
    return result


class _Unprepared(Exception):
    pass


def _nothing_prepared(tensors: Tensors, by_group: dict[str, Tensors], reason: str) -> PreparedCommit:
    return PreparedCommit(fallback=list(tensors), fallback_modules=list(by_group), reason=reason)


def _owners(model: torch.nn.Module, group: str) -> dict[str, torch.nn.Module] | None:
    """The modules under `group` that own tensors, if every one can be prepared (else None)."""
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

    try:
        module = model.get_submodule(group)
    except AttributeError:
        return None
    owners = {
        f"{group}.{name}" if name else group: m
        for name, m in module.named_modules()
        if any(t is not None for t in (*m._parameters.values(), *m._buffers.values()))
    }
    for m in owners.values():
        if not _preparable(m):
            return None
        info = LAYERWISE_INFO.get(m)
        if info is None or info.restore_metadata[1]:  # no reload metadata, or buffers to restore
            return None
        if set(info.restore_metadata[0]) != {n for n, t in m._parameters.items() if t is not None} - {"bias"}:
            return None  # `bias` is made after create_weights and is never restored (vLLM's SKIP_TENSORS)
    return owners or None


def _preparable(module: torch.nn.Module) -> bool:
    method = getattr(module, "quant_method", None)
    return method is None or type(method).__name__ in PREPARED_METHODS


def _tied_partners(model: torch.nn.Module, targets: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
    """Modules sharing a parameter with a target without being one (a tied LM head): reprocessed."""
    shared = {id(t) for m in targets.values() for t in m._parameters.values() if t is not None}
    partners = {}
    for path, m in model.named_modules(remove_duplicate=False):
        if path not in targets and any(id(t) in shared for t in m._parameters.values() if t is not None):
            if not _preparable(m):
                raise _Unprepared(f"{path} shares a weight and is not preparable")
            partners[path] = m
    return partners


def _shadow(live: torch.nn.Module) -> torch.nn.Module:
    shadow = live.__class__.__new__(live.__class__)
    shadow.__dict__.update(live.__dict__)
    for key in _MODULE_DICTS:
        shadow.__dict__[key] = dict(live.__dict__[key])
    return shadow


def _shadow_tree(model: torch.nn.Module, modules: dict[str, torch.nn.Module]):
    """A copy of the module tree along the paths to `modules` (everything else shared with the live
    model): the root, and path -> shadow."""
    shadows = {"": _shadow(model)}
    for path in sorted(modules, key=lambda p: p.count(".")):
        parts = path.split(".")
        for i in range(1, len(parts) + 1):
            sub = ".".join(parts[:i])
            if sub not in shadows:
                shadows[sub] = _shadow(model.get_submodule(sub))
                shadows[".".join(parts[: i - 1])]._modules[parts[i - 1]] = shadows[sub]
    return shadows[""], shadows


def _restore(shadow: torch.nn.Module, live: torch.nn.Module) -> None:
    """Give `shadow` fresh tensors in checkpoint form (as vLLM's reload restores a layer), its weight
    loaders bound to the shadow."""
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO, _get_original_loader
    from vllm.model_executor.model_loader.reload.meta import materialize_meta_tensor
    from vllm.model_executor.model_loader.reload.sanitize import layer_ref_sentinel

    info = LAYERWISE_INFO[live]
    with info.restore_device:
        for name, meta in info.restore_metadata[0].items():
            fresh = materialize_meta_tensor(meta)

            def rebound(value):
                bound_to = getattr(value, "__self__", None)
                if hasattr(value, "__func__") and bound_to in (live, layer_ref_sentinel):
                    return value.__func__.__get__(shadow)
                return value

            for key, value in list(fresh.__dict__.items()):
                fresh.__dict__[key] = rebound(value)
            if hasattr(fresh, "weight_loader"):  # a vLLM parameter's is a property over `_weight_loader`
                # without the wrapper a reload of the live layer left (it would buffer into the live layer)
                fresh.weight_loader = rebound(_get_original_loader(fresh))
            shadow._parameters[name] = fresh
        bias = live._parameters.get("bias")
        if bias is not None:
            fresh = torch.empty_like(bias)
            fresh.__class__, fresh.__dict__ = bias.__class__, dict(bias.__dict__)
            shadow._parameters["bias"] = fresh


def _restored_bytes(module: torch.nn.Module) -> int:
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

    metas = LAYERWISE_INFO[module].restore_metadata[0].values()
    bias = module._parameters.get("bias")
    tensors = [*metas, *([bias] if bias is not None else [])]
    return sum(t.numel() * t.element_size() for t in tensors)


def _load_size(shadow: torch.nn.Module) -> int:
    return sum(getattr(t, "weight_loader_numel", t.numel()) for t in _tensors(shadow).values())


def _share_tied(shadow, live, targets, shadows) -> None:
    """Point a tied partner's shadow at its owner's new tensor."""
    by_id = {
        id(t): shadows[path]._parameters[name]
        for path, m in targets.items()
        for name, t in m._parameters.items()
        if t is not None
    }
    for name, t in live._parameters.items():
        if t is not None and id(t) in by_id:
            shadow._parameters[name] = by_id[id(t)]


def _process(shadow: torch.nn.Module) -> None:
    method = getattr(shadow, "quant_method", None)
    if method is not None:
        method.process_weights_after_loading(shadow)


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t for n, t in module._parameters.items() if t is not None}


def _held_tensors(model: torch.nn.Module) -> list[tuple[torch.nn.Module, dict]]:
    return [(m, dict(m._parameters)) for m in model.modules()]


def _check_held(model: torch.nn.Module, held: list[tuple[torch.nn.Module, dict]]) -> None:
    """The live modules still hold their own tensors (a loader that reached a live layer would have
    replaced them): put back and refuse if not."""
    moved = [m for m, params in held if any(m._parameters.get(k) is not v for k, v in params.items())]
    for m, params in held:
        m._parameters.update(params)
    if moved:
        raise _Unprepared(f"loading replaced a live module's tensors ({type(moved[0]).__name__})")


def _storage(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return 0


class _LiveWriteGuard(TorchDispatchMode):
    """While the stage loads shadows (this thread only): any op that writes into a live tensor raises,
    and the elements copied into each shadow tensor are counted (vLLM's reload counts them the same
    way to know a layer is fully loaded)."""

    def __init__(self, model, shadows, targets):
        super().__init__()
        shadow_ids = {_storage(t) for p in targets for t in _tensors(shadows[p]).values()}
        self.live = {_storage(t) for t in (*model.parameters(), *model.buffers())} - {0} - shadow_ids
        self.copied: dict[int, int] = {}

    def loaded(self, shadow: torch.nn.Module) -> int:
        return sum(min(self.copied.get(_storage(t), 0), t.numel()) for t in _tensors(shadow).values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        schema = func._schema
        if schema.is_mutable:
            for arg, value in zip(schema.arguments, args, strict=False):
                if arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, torch.Tensor):
                    ptr = _storage(value)
                    if ptr in self.live:
                        raise _Unprepared(f"loading wrote a live tensor ({func})")
                    if func is torch.ops.aten.copy_.default:
                        self.copied[ptr] = self.copied.get(ptr, 0) + value.numel()
        return func(*args, **kwargs)
