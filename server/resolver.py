"""One resolver: a model name → what to serve it with, computed once per request from one registry
snapshot — the alias's choice, the variant, its recipe, its lane (a swap of the engine's weights,
or a LoRA adapter on the plain base), the engine group, and the chat template and stop tokens its
post model brings. Which engine of the group, and when, is the admission's (server/admission.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from deltas import Recipe
from deltas.store import file_identity, is_uri
from server.adapters import Adapter, AdapterLane
from server.aliases import choose
from server.errors import ConflictError, GatewayError
from server.registry import DeltaRecord, Registry, VariantRecord, unknown_model
from server.tenancy import ROOT, Principal

# A base's checkpoint, read once: (its end-of-sequence token ids, its chat template).
BaseInfo = Callable[[str], tuple[set[int], str | None]]


@dataclass(frozen=True)
class Target:
    """What one request for a model name is served with."""

    variant: VariantRecord
    recipe: Recipe
    group: str  # the engine group: the base its engines were started on (a runtime base may be hosted)
    chat_template: str | None
    stop_token_ids: list[int]
    adapter: Adapter | None = None  # served as this LoRA adapter on the plain base, not by a swap
    alias: str | None = None  # the alias the request named, resolved to `variant`

    @property
    def engine_model(self) -> str:
        """The model name the engine serves this request under (and puts in its answers)."""
        return self.adapter.name if self.adapter else self.group  # engines serve their base's name


class Resolver:
    """Model names to targets, over the registry and the adapter lane."""

    def __init__(self, registry: Registry, adapters: AdapterLane, base_info: BaseInfo):
        self.registry, self.adapters, self.base_info = registry, adapters, base_info

    def resolve(
        self, model: str, key: str | None = None, *, continued: str | None = None, caller: Principal = ROOT
    ) -> Target:
        """The target serving `model`; an alias picks one of its targets (sticky for the client `key`;
        `continued`: that one, if the alias still routes to it). A model outside `caller`'s scopes is
        unknown to it: the same 404 as a name nobody registered."""
        state = self.registry.snapshot(model)
        alias = state.aliases.get(model)
        name = model
        if alias is not None:
            name = continued if continued in alias.split() else choose(alias, key)
            if name not in state.variants and name not in state.bases:
                state = self.registry.snapshot(name)  # defined by another gateway since
        variant = state.variant(name)
        if not caller.may_use(model, variant.base):
            raise unknown_model(model)
        base = state.bases[variant.base]
        group = base.group
        deltas = state.deltas_of(variant)
        template, stops = None, []
        for record in deltas:
            _unchanged(record)
            template = template or record.chat_template
            stops += record.eos_token_ids  # the post model's end-of-turn tokens
        if group != base.name:  # a hosted base: the engine speaks with its own base's template and stops
            base_stops, base_template = self.base_info(base.name)
            template = template or base_template
            stops += sorted(base_stops)
        engine_stops = self.base_info(group)[0]  # the engine stops on these by itself
        eos = [e for e in dict.fromkeys(stops) if e not in engine_stops]
        recipe = state.recipe(variant)
        adapter = self.adapters.serving(variant, base, recipe, deltas)
        return Target(variant, recipe, group, template, eos, adapter, alias.name if alias else None)

    def lane(self, name: str) -> tuple[str, str | None]:
        """How `name` is served ("swap" or "adapter") and, if not as an adapter, why."""
        state = self.registry.snapshot(name)
        variant = state.variant(name)
        why = self.adapters.not_adapter(variant, state.bases[variant.base], state.deltas_of(variant))
        return ("swap", why) if why else ("adapter", None)

    def holding(self, group: str, resident: Recipe) -> str | None:
        """Which registered model holds the weights `resident` an engine of `group` was found with (a
        gateway restarted, its engines not): for /v1/engines and metrics; admission goes by weights."""
        state = self.registry.state
        for variant in state.variants.values():
            base = state.bases.get(variant.base)
            if base is None or base.group != group or variant.lane == "adapter":
                continue
            try:
                if state.recipe(variant).key() == resident.key():
                    return variant.name
            except GatewayError:  # a delta gone: not what it holds
                continue
        return None


def _unchanged(record: DeltaRecord) -> None:
    """409 if a delta registered from a file was changed or removed since (a stored artifact never
    changes: it is named by its hash)."""
    if is_uri(record.path):
        return
    try:
        identity = file_identity(record.path)[:2]
    except OSError:
        identity = None
    if identity != (record.size_bytes, record.mtime_ns):
        raise ConflictError(
            f"delta {record.name!r}: {record.path} is missing or changed since it was registered; "
            "register it again"
        )
