"""The registry of bases, deltas and variants: one JSON document in the state database, versioned.

Every change is a compare-and-swap on its version (server/statedb.py): a gateway applies the change
to the registry as it last read it and writes it only if no other gateway wrote since; if one did,
it reads theirs and applies the change again (so a name taken meanwhile is a 409, not a lost write).
Other gateways' changes are pulled when a request names a model this gateway does not know, and
every `state_poll_seconds` (so a deletion is seen within that bound).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Literal, TypeVar

import sqlalchemy as sa
from pydantic import AliasChoices, BaseModel, Field, field_validator, model_validator

from deltas.merge_methods import MethodName, check_terms
from deltas.recipe import DeltaTerm, Recipe
from server.aliases import AliasRecord, AliasTarget
from server.errors import BadRequestError, ConflictError, NotFoundError, UnavailableError
from server.statedb import Store, metadata, shared

Lane = Literal["auto", "swap", "adapter"]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


def unknown_model(name: str) -> NotFoundError:
    """The 404 for a model name nobody registered (or one the caller may not see)."""
    return NotFoundError(f"unknown model {name!r}; list them with GET /v1/models")


def check_name(value: str) -> str:
    if not _NAME.match(value):
        raise ValueError(
            "names are 1-128 characters: letters, digits and . _ : / -, starting with a letter or digit"
        )
    return value


class BaseRecord(BaseModel):
    """A base model: a checkpoint dir, and which engine serves it."""

    name: str
    path: str
    # "engine" in registries written before 0.x: read, never written (one name for one thing).
    host: str | None = Field(
        None,
        validation_alias=AliasChoices("host", "engine"),
        description="the base whose engines hot-load this one (None: engines of its own)",
    )
    runtime: bool = Field(False, description="registered through the API (not a start-up flag)")
    architecture: str = ""
    content_hash: str = Field("", description="sha256 over its tensors; a delta extracted on it names it")
    vocab_digest: str | None = Field(None, description="sha256 of its tokenizer's token -> id map")
    files: str = Field("", description="size and mtime of its weight files (content_hash is reused)")
    tool_parser: str | None = Field(None, description="vLLM's tool-call parser its engine runs (None: none)")

    @property
    def group(self) -> str:
        """The engine group serving it: its own engines (started on it), or its host's."""
        return self.host or self.name


class DeltaRecord(BaseModel):
    """A registered artifact; size and mtime detect a file changed after registration."""

    name: str
    path: str
    size_bytes: int
    mtime_ns: int
    base_architecture: str
    base_content_hash: str
    tensors: int
    encodings: list[str] = Field(default_factory=lambda: ["dense"], description="codecs its tensors use")
    lossless: bool = Field(True, description="rebuilds the post-trained weights exactly on its base")
    chat_template: str | None = None
    eos_token_ids: list[int] = Field(default_factory=list)
    uploaded: bool = False
    adapter_rank: int | None = Field(None, description="LoRA rank that carries it exactly (None: cannot)")
    adapter_unfit: str | None = Field(None, description="why it cannot be a LoRA adapter")
    vocab_digest: str | None = Field(None, description="its post model's tokenizer (token -> id map)")
    source: str | None = Field(
        None, description="the local file it was registered from, when `path` is its artifact-store URI"
    )
    source_mtime_ns: int | None = Field(None, description="that file's mtime (a newer one is re-registered)")


class VariantTerm(BaseModel):
    delta: str
    alpha: float = 1.0
    density: float = Field(1.0, gt=0, le=1, description="fraction kept by ties/dare_* (1: all)")


class VariantRecord(BaseModel):
    name: str
    base: str
    deltas: list[VariantTerm] = Field(default_factory=list)
    method: MethodName = "linear"
    normalize: bool | None = None
    seed: int = Field(0, ge=0)
    allow_vocab_mismatch: bool = Field(
        False, description="serve deltas whose post model's tokenizer differs from this base's"
    )
    lane: Lane = Field(
        "auto",
        description="swap: the engine's resident weights; adapter: a vLLM LoRA adapter on the resident "
        "base; auto: adapter where the variant fits one and the engine has LoRA slots",
    )

    _check = field_validator("name")(check_name)

    @model_validator(mode="after")
    def _method_takes_it(self) -> VariantRecord:
        check_terms(self.method, [t.density for t in self.deltas], self.seed)
        return self


class RegistryState(BaseModel):
    bases: dict[str, BaseRecord] = Field(default_factory=dict)
    deltas: dict[str, DeltaRecord] = Field(default_factory=dict)
    variants: dict[str, VariantRecord] = Field(default_factory=dict)
    aliases: dict[str, AliasRecord] = Field(default_factory=dict)

    def require_free(self, name: str) -> None:
        """409 if a base, variant or alias already answers to model name `name` (the one check of
        it: inside every compare-and-swap that adds a name, and before slow work as a fast answer)."""
        for kind, names in (("base", self.bases), ("variant", self.variants), ("alias", self.aliases)):
            if name in names:
                raise ConflictError(f"model name {name!r} is taken by a {kind}")

    def variant(self, name: str) -> VariantRecord:
        """A variant by name, in this state; a base's name is the variant of the plain base."""
        if name in self.variants:
            return self.variants[name]
        if name in self.bases:
            return VariantRecord(name=name, base=name)
        raise unknown_model(name)

    def base_of(self, name: str) -> str:
        """The base model `name` is served on: a variant's, a base itself, an alias's first target's."""
        alias = self.aliases.get(name)
        return self.variant(alias.targets[0].variant if alias else name).base

    def deltas_of(self, variant: VariantRecord) -> list[DeltaRecord]:
        """The registered deltas `variant` adds, in order."""
        return [
            _get(self.deltas, t.delta, f"unknown delta {t.delta!r}; list them with GET /v1/deltas")
            for t in variant.deltas
        ]

    def recipe(self, variant: VariantRecord) -> Recipe:
        """The weights `variant` stands for: its base's checkpoint and its deltas' registered paths."""
        base = _get(self.bases, variant.base, f"unknown base {variant.base!r}; known: {sorted(self.bases)}")
        terms = [
            DeltaTerm(path=d.path, alpha=t.alpha, density=t.density)
            for t, d in zip(variant.deltas, self.deltas_of(variant), strict=True)
        ]
        return Recipe(
            base=base.path,
            deltas=terms,
            method=variant.method,
            normalize=variant.normalize,
            seed=variant.seed,
        )

    def routed_by(self, model: str) -> list[str]:
        """The aliases that send requests to `model`."""
        return sorted(a.name for a in self.aliases.values() if any(t.variant == model for t in a.targets))


T = TypeVar("T")
_table = sa.Table(
    "registry",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("body", sa.Text, nullable=False),
)
ATTEMPTS = 20  # compare-and-swap rounds before a change gives up (only under a storm of writers)


class Registry(Store):
    """The registry as this gateway last read it (`state`), changed only through compare-and-swap."""

    def __init__(self, engine: sa.Engine):
        super().__init__(engine)
        self.shared = shared(engine)
        self.state, self.version = RegistryState(), 0
        self.refresh(force=True)

    def refresh(self, force: bool = False) -> bool:
        """Read what other gateways wrote since (a shared database, or `force`); whether anything
        changed. One indexed read of the version; the document only when it moved."""
        if not (self.shared or force):
            return False

        def read(conn: sa.Connection):
            version = conn.execute(sa.select(_table.c.version)).scalar()
            if version is None or version == self.version:
                return None
            return conn.execute(sa.select(_table.c.version, _table.c.body)).first()

        row = self._run(read)
        if row is None:
            return False
        self.state, self.version = RegistryState.model_validate_json(row.body), row.version
        return True

    def _change(self, change: Callable[[RegistryState], T]) -> T:
        """Apply `change` to a copy of the latest state and write it unless another writer was first."""
        self.refresh()  # start from what other gateways wrote (one read of the version when shared)
        for _ in range(ATTEMPTS):
            state = self.state.model_copy(deep=True)
            result = change(state)  # raises (404, 409) before anything is written
            if self._run(lambda c, s=state: _swap(c, s, self.version)):
                self.state, self.version = state, self.version + 1
                return result
            self.refresh(force=True)  # another gateway wrote: apply the change to theirs
        raise UnavailableError("the registry is being changed by other gateways all the time; retry")

    # bases -------------------------------------------------------------
    def put_base(self, record: BaseRecord, *, replace: bool = False) -> None:
        """Add a base; its name must be free, unless `replace` (a start-up base: the command line wins
        over a runtime base of that name)."""

        def change(state: RegistryState) -> None:
            if not (replace and record.name in state.bases):
                state.require_free(record.name)
            state.bases[record.name] = record

        self._change(change)

    def remove_base(self, name: str) -> BaseRecord:
        def change(state: RegistryState) -> BaseRecord:
            _get(state.bases, name, f"unknown base {name!r}; known: {sorted(state.bases)}")
            users = [v.name for v in state.variants.values() if v.base == name]
            if users:
                raise ConflictError(f"base {name!r} is used by variants {users}; delete them first")
            _not_routed(state, name)
            return state.bases.pop(name)

        return self._change(change)

    def base(self, name: str) -> BaseRecord:
        if name not in self.state.bases:
            self.refresh()  # another gateway may have added it
        return _get(self.state.bases, name, f"unknown base {name!r}; known: {sorted(self.state.bases)}")

    # deltas ------------------------------------------------------------
    def add_delta(self, record: DeltaRecord) -> None:
        def change(state: RegistryState) -> None:
            if record.name in state.deltas:
                raise ConflictError(f"delta {record.name!r} exists; delete it first")
            state.deltas[record.name] = record

        self._change(change)

    def delta(self, name: str) -> DeltaRecord:
        if name not in self.state.deltas:
            self.refresh()
        return _get(self.state.deltas, name, f"unknown delta {name!r}; list them with GET /v1/deltas")

    def remove_delta(self, name: str) -> DeltaRecord:
        def change(state: RegistryState) -> DeltaRecord:
            _get(state.deltas, name, f"unknown delta {name!r}; list them with GET /v1/deltas")
            users = [v.name for v in state.variants.values() if any(t.delta == name for t in v.deltas)]
            if users:
                raise ConflictError(f"delta {name!r} is used by variants {users}; delete them first")
            return state.deltas.pop(name)

        return self._change(change)

    # variants ----------------------------------------------------------
    def add_variant(self, record: VariantRecord) -> None:
        def change(state: RegistryState) -> None:
            state.require_free(record.name)
            state.variants[record.name] = record

        self._change(change)

    def variant(self, name: str) -> VariantRecord:
        """A variant by name; a base's name is the variant of the plain base."""
        state = self.snapshot(name)
        if name in state.aliases:
            targets = ", ".join(t.variant for t in state.aliases[name].targets)
            raise BadRequestError(f"{name!r} is an alias (of {targets}); name a variant here")
        return state.variant(name)

    def snapshot(self, name: str | None = None) -> RegistryState:
        """The registry as this gateway knows it, pulled from the database first if it does not know
        model `name` (another gateway may have defined it). Never changed in place (a change makes a
        new state), so a request reads one consistent state however long it holds it."""
        state = self.state
        if name is not None and not (name in state.aliases or name in state.variants or name in state.bases):
            self.refresh()
        return self.state

    def remove_variant(self, name: str) -> None:
        def change(state: RegistryState) -> None:
            _get(state.variants, name, f"unknown variant {name!r}")
            _not_routed(state, name)
            del state.variants[name]

        self._change(change)

    def model_names(self) -> list[str]:
        return sorted(self.state.bases) + sorted(self.state.variants) + sorted(self.state.aliases)

    # aliases -----------------------------------------------------------
    def alias(self, name: str) -> AliasRecord:
        if name not in self.state.aliases:
            self.refresh()
        return _get(self.state.aliases, name, f"unknown alias {name!r}; list them with GET /v1/aliases")

    def set_alias(
        self,
        name: str,
        targets: list[AliasTarget],
        *,
        create: bool | None = None,
        previous: list[AliasTarget] | None = None,
    ) -> AliasRecord:
        """Point alias `name` at `targets` in one atomic change (the old targets become `previous`,
        unless given: a canary's steps all roll back to where it started). `create`: True only a new
        alias, False only an existing one, None either."""

        def change(state: RegistryState) -> AliasRecord:
            old = state.aliases.get(name)
            if create is True and old is not None:
                raise ConflictError(f"alias {name!r} exists; PUT /v1/aliases/{name} moves it")
            if create is False and old is None:
                raise NotFoundError(f"unknown alias {name!r}; list them with GET /v1/aliases")
            if old is None:
                state.require_free(name)
            for target in targets:
                if target.variant in state.aliases:
                    raise BadRequestError(f"target {target.variant!r} is an alias; aliases point at variants")
                if target.variant not in state.variants and target.variant not in state.bases:
                    raise NotFoundError(f"alias {name!r}: unknown variant {target.variant!r}")
            if old is not None and old.targets == targets:
                return old  # nothing moves: keep the rollback point
            record = AliasRecord(
                name=name,
                targets=targets,
                previous=previous if previous is not None else (old.targets if old else None),
                generation=old.generation + 1 if old else 1,
            )
            state.aliases[name] = record
            return record

        return self._change(change)

    def rollback_alias(self, name: str) -> AliasRecord:
        """Point alias `name` back at its previous targets (atomically; rolling back again redoes)."""
        record = self.alias(name)
        if record.previous is None:
            raise ConflictError(f"alias {name!r} has never moved; nothing to roll back to")
        return self.set_alias(name, record.previous, create=False)

    def remove_alias(self, name: str) -> None:
        def change(state: RegistryState) -> None:
            _get(state.aliases, name, f"unknown alias {name!r}; list them with GET /v1/aliases")
            del state.aliases[name]

        self._change(change)


def _get(records: dict, name: str, message: str):
    try:
        return records[name]
    except KeyError:
        raise NotFoundError(message) from None


def _not_routed(state: RegistryState, name: str) -> None:
    """409 while an alias sends requests to `name`."""
    aliases = state.routed_by(name)
    if aliases:
        raise ConflictError(f"aliases {aliases} send requests to {name!r}; move or delete them first")


def _swap(conn: sa.Connection, state: RegistryState, version: int) -> bool:
    """Write `state` as version+1 if the stored version is still `version` (else False)."""
    body = state.model_dump_json(indent=2)
    if version == 0:
        exists = conn.execute(sa.select(_table.c.id)).first() is not None
        if exists:
            return False
        try:
            with conn.begin_nested():
                conn.execute(sa.insert(_table).values(id=1, version=1, body=body))
        except sa.exc.IntegrityError:  # another gateway inserted first
            return False
        return True
    done = conn.execute(
        sa.update(_table)
        .where(_table.c.id == 1, _table.c.version == version)
        .values(version=version + 1, body=body)
    )
    return done.rowcount == 1


def import_json(engine: sa.Engine, text: str) -> None:
    """Make the registry of an earlier version's registry.json the database's (if it has none yet)."""
    registry = Registry(engine)
    if registry.version == 0:
        state = RegistryState.model_validate_json(text)

        def change(current: RegistryState) -> None:
            current.bases, current.deltas, current.variants = state.bases, state.deltas, state.variants

        registry._change(change)
