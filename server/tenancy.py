"""Projects and scoped keys: who may run which models and manage which names.

A project owns the names under its prefix (`team-a/...`: its deltas, variants, aliases and runtime
bases), and the evals and rebases its admin keys make; it may have limits of its own over all its
keys (server/quota.py). A key belongs to a project and carries scopes:

- `models`: what it may run inference on. Each entry is a name (`team-a/chat`), a prefix ending in
  `/` or `*` (`team-a/*`), `base:NAME` (that base and every variant defined on it: access follows
  the family of variants, not a list of names), or `*` (everything).
- `admin`: it may also register, define, alias and delete names under its project's prefix, and
  evaluate and rebase its variants (server/deps.PROJECT_ROUTES; each service checks the names).

The admin token (`serve --admin-token`) is root: every admin route, every project's names; it is no
inference key (it would travel with traffic), so root runs inference with a key it creates, e.g. with
models `*`. Keys given with `serve --api-key` run inference on every model, as before. Once a scoped
key has been made (revoked ones count), every inference call needs a key.
A model outside a key's scopes answers 404, as a name that does not exist: a key cannot learn what
other projects serve.

Keys live in the state database, the secret hashed (SHA-256: secrets are 32 random bytes, so a slow
hash buys nothing), shown once at creation and rotation. Each gateway keeps the keys in memory and
reloads them every `poll` seconds (the registry's poll interval), so a revoke on one front holds on
every front sharing the database within one poll. Last-used times are written back on that reload,
not per request.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.errors import BadRequestError, ConflictError, ForbiddenError, NotFoundError, UnauthorizedError
from server.quota import NO_LIMITS, Limits
from server.statedb import Store, metadata

PRIORITIES = ("interactive", "batch")
SECRET_PREFIX = "dg-"
# What a stored object (a file, a batch, an eval, its run, a rebase) keeps of whose it is, never shown:
# the project that owns it, and the id of the key whose scopes its work runs with.
PROJECT, KEY = "_project", "_key"
_PROJECT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("project", sa.String(64), nullable=False),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("secret_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("models", sa.JSON, nullable=False),
    sa.Column("admin", sa.Boolean, nullable=False),
    sa.Column("priority", sa.String(16), nullable=False),
    sa.Column("limits", sa.JSON, nullable=False, default=dict),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("last_used_at", sa.Float, nullable=True),
    sa.Column("revoked_at", sa.Float, nullable=True),
)

projects = sa.Table(  # a project's own limits, over all its keys (a project exists by its keys alone)
    "projects",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("limits", sa.JSON, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)


class KeyCreate(BaseModel):
    """A key to create in a project: its name, the models it may use, whether it administers the
    project's names, its priority class."""

    name: str = Field(min_length=1, max_length=128)
    models: list[str] | None = Field(None, max_length=64, description="Default: the project's own names")
    admin: bool = False
    priority: str = "interactive"
    limits: Limits = Field(default_factory=Limits)

    @field_validator("priority")
    @classmethod
    def _known_priority(cls, value: str) -> str:
        if value not in PRIORITIES:
            raise ValueError(f"priority is one of {', '.join(PRIORITIES)}")
        return value


class KeyUpdate(BaseModel):
    """What to change on a live key (each field given replaces the key's: `limits` as a whole)."""

    model_config = ConfigDict(extra="forbid")

    models: list[str] | None = Field(None, min_length=1, max_length=64)
    admin: bool | None = None
    priority: str | None = None
    limits: Limits | None = None

    @field_validator("priority")
    @classmethod
    def _known_priority(cls, value: str | None) -> str | None:
        if value is not None and value not in PRIORITIES:
            raise ValueError(f"priority is one of {', '.join(PRIORITIES)}")
        return value


class ProjectLimits(BaseModel):
    """A project's limits over all its keys' requests, beside each key's own."""

    project: str
    limits: Limits
    updated_at: float | None = None


class KeyPublic(BaseModel):
    """A key as listed: never its secret."""

    id: str
    project: str
    name: str
    models: list[str]
    admin: bool
    priority: str
    limits: Limits = Field(default_factory=Limits)
    created_at: float
    last_used_at: float | None = None
    revoked_at: float | None = None


class KeyCreated(KeyPublic):
    """A key just created or rotated: the secret, shown this once."""

    secret: str


def check_project(project: str) -> str:
    """400 unless `project` is a valid project name (it prefixes the names it owns: `project/...`)."""
    if not _PROJECT.match(project):
        raise BadRequestError(
            f"invalid project {project!r}: 1-64 letters, digits and . _ -, starting with a letter or digit"
        )
    return project


def hashed(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who is calling: what it may run and manage, and its name for usage and metrics (never a secret)."""

    name: str  # "root", "api-key", "anonymous", or "PROJECT/KEY NAME"
    project: str | None = None
    models: tuple[str, ...] = ("*",)
    admin: bool = False
    root: bool = False
    priority: str = "interactive"
    key_id: str | None = None
    limits: Limits = field(default_factory=lambda: NO_LIMITS)
    project_limits: Limits = field(default_factory=lambda: NO_LIMITS)  # the project's, over all its keys

    def quotas(self) -> list[tuple[str, Limits]]:
        """The windows a request of this caller counts in: its key's and its project's, where limited
        (window names: PROJECT/NAME for a key, PROJECT for a project)."""
        out = [(self.name, self.limits)] if self.limits.any() else []
        if self.project is not None and self.project_limits.any():
            out.append((self.project, self.project_limits))
        return out

    def may_use(self, name: str, base: str | None = None) -> bool:
        """Whether inference on model `name` (a variant of `base`, or a base) is in scope."""
        return self.root or any(_covers(p, name, base) for p in self.models)

    def owns(self, project: str | None) -> bool:
        """Whether this caller may see and act on what `project` made (None: root's): an eval, a
        rebase. Root: everything; a project's key: its project's."""
        return self.root or (self.project is not None and project == self.project)

    def may_manage(self, name: str) -> bool:
        """Whether this caller may register, change or delete `name`."""
        return self.root or (self.admin and self.project is not None and name.startswith(self.project + "/"))


def not_managed(caller: Principal, name: str) -> ForbiddenError:
    """The 403 for a name outside what `caller` manages."""
    return ForbiddenError(
        f"key {caller.name!r} manages only names under {caller.project}/; {name!r} is not one"
    )


ROOT = Principal("root", root=True)
ANYONE = Principal("anonymous")
LEGACY = Principal("api-key")


def _covers(pattern: str, name: str, base: str | None) -> bool:
    if pattern == "*" or pattern == name:
        return True
    if pattern.startswith("base:"):
        return pattern[5:] in (name, base)
    if pattern.endswith(("*", "/")):
        return name.startswith(pattern.rstrip("*"))
    return False


class KeyStore(Store):
    """The api_keys table."""

    def create(self, project: str, body: KeyCreate) -> KeyCreated:
        """A new key in `project` (409 if the project has a live key of that name)."""
        check_project(project)
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        row = {
            "id": "key_" + uuid.uuid4().hex[:24],
            "project": project,
            "secret_hash": hashed(secret),
            "created_at": time.time(),
            **body.model_dump(),
            "models": body.models if body.models is not None else [f"{project}/*"],
        }

        def work(conn):
            taken = sa.select(api_keys.c.id).where(
                api_keys.c.project == project, api_keys.c.name == body.name, api_keys.c.revoked_at.is_(None)
            )
            if conn.execute(taken).first() is not None:
                raise ConflictError(f"project {project!r} already has a key named {body.name!r}")
            conn.execute(api_keys.insert().values(**row))

        self._run(work)
        return KeyCreated(**{k: v for k, v in row.items() if k != "secret_hash"}, secret=secret)

    def list(self, project: str | None = None) -> list[KeyPublic]:
        """Every key (of `project`), revoked ones included, oldest first."""
        query = sa.select(api_keys).order_by(api_keys.c.created_at)
        if project is not None:
            query = query.where(api_keys.c.project == project)
        return self._run(lambda conn: [_public(r) for r in conn.execute(query).mappings()])

    def get(self, key_id: str) -> KeyPublic:
        row = self._run(lambda conn: conn.execute(sa.select(api_keys).where(api_keys.c.id == key_id)).first())
        if row is None:
            raise NotFoundError(f"unknown key {key_id!r}; list them with GET /v1/keys")
        return _public(row._mapping)

    def revoke(self, key_id: str) -> KeyPublic:
        """Revoke a key for good (its secret stops working on every front within a poll)."""
        self.get(key_id)
        update = api_keys.update().where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
        self._run(lambda conn: conn.execute(update.values(revoked_at=time.time())))
        return self.get(key_id)

    def rotate(self, key_id: str) -> KeyCreated:
        """A new secret for a live key; the old one stops working."""
        key = self.get(key_id)
        if key.revoked_at is not None:
            raise ConflictError(f"key {key_id!r} is revoked; create a new one")
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        update = api_keys.update().where(api_keys.c.id == key_id).values(secret_hash=hashed(secret))
        self._run(lambda conn: conn.execute(update))
        return KeyCreated(**key.model_dump(), secret=secret)

    def update(self, key_id: str, body: KeyUpdate) -> KeyPublic:
        """Change a live key's scopes, class or limits (every front follows within a poll)."""
        if self.get(key_id).revoked_at is not None:
            raise ConflictError(f"key {key_id!r} is revoked; create a new one")
        values = body.model_dump(exclude_unset=True, exclude_none=True)
        if values:
            update = api_keys.update().where(api_keys.c.id == key_id).values(**values)
            self._run(lambda conn: conn.execute(update))
        return self.get(key_id)

    def project_limits(self, project: str) -> ProjectLimits:
        """A project's limits (none set: no limits)."""
        check_project(project)
        query = sa.select(projects).where(projects.c.name == project)
        row = self._run(lambda conn: conn.execute(query).first())
        if row is None:
            return ProjectLimits(project=project, limits=Limits())
        return ProjectLimits(project=project, limits=Limits(**row.limits), updated_at=row.updated_at)

    def set_project_limits(self, project: str, limits: Limits) -> ProjectLimits:
        """Set (replace) a project's limits."""
        check_project(project)
        values = {"limits": limits.model_dump(exclude_none=True), "updated_at": time.time()}

        def work(conn):
            where = projects.c.name == project
            if conn.execute(projects.update().where(where).values(**values)).rowcount == 0:
                conn.execute(projects.insert().values(name=project, **values))

        self._run(work)
        return self.project_limits(project)

    def live(self) -> tuple[dict[str, Principal], bool]:
        """Secret hash -> principal for every key not revoked; whether any key was ever made."""

        def work(conn):
            return list(conn.execute(sa.select(api_keys)).mappings()), {
                r.name: Limits(**r.limits) for r in conn.execute(sa.select(projects))
            }

        rows, limits = self._run(work)
        live = {r["secret_hash"]: _principal(r, limits) for r in rows if r["revoked_at"] is None}
        return live, bool(rows)

    def touch(self, used: dict[str, float]) -> None:
        """Record last-used times (key id -> time)."""

        def work(conn):
            for key_id, at in used.items():
                conn.execute(api_keys.update().where(api_keys.c.id == key_id).values(last_used_at=at))

        if used:
            self._run(work)


def _public(row) -> KeyPublic:
    return KeyPublic(**{k: v for k, v in dict(row).items() if k != "secret_hash"})


def _principal(row, project_limits: dict[str, Limits]) -> Principal:
    return Principal(
        f"{row['project']}/{row['name']}",
        row["project"],
        tuple(row["models"]),
        bool(row["admin"]),
        priority=row["priority"],
        key_id=row["id"],
        limits=Limits(**(row["limits"] or {})),
        project_limits=project_limits.get(row["project"], NO_LIMITS),
    )


class Keys:
    """Bearer credentials to principals: the admin token, the --api-key keys, the stored keys (reloaded
    every `poll` seconds, and at once after a change made here)."""

    def __init__(self, store: KeyStore, admin_token: str | None, api_keys: list[str], poll: float):
        self.store, self.poll = store, poll
        self._fixed = {hashed(k): LEGACY for k in api_keys}
        self._api_keyed = bool(api_keys)  # --api-key given: inference needs a key
        if admin_token:
            self._fixed[hashed(admin_token)] = ROOT
        self._stored: dict[str, Principal] = {}
        self._keyed = False  # a key was ever made: from then on, inference needs one (revoking all closes it)
        self._loaded = float("-inf")
        self._used: dict[str, float] = {}
        self._lock = threading.Lock()

    def principal(self, authorization: str | None, *, admin: bool = False) -> Principal:
        """Who sends `authorization` (`Bearer <secret>`); 401 if a credential is needed and this one is
        missing or unknown. `admin`: an admin route (root or a project admin key)."""
        stored = self._current()
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        digest = hashed(token) if token else None
        found = self._fixed.get(digest) or stored.get(digest) if digest else None
        if admin:
            if found is None or not (found.root or found.admin):
                raise UnauthorizedError(
                    "admin token missing or wrong: send 'Authorization: Bearer <admin token>' "
                    "(or a project key with admin scope)"
                )
        # the admin token is no inference key: it never travels with traffic
        elif found is None or found.root:
            if self._api_keyed or self._keyed:
                raise UnauthorizedError(
                    "API key missing or wrong: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>')"
                )
            return ANYONE
        if found.key_id is not None:
            self._used[found.key_id] = time.time()
        return found

    def of(self, key_id: str | None) -> Principal:
        """The principal of stored key `key_id` (work it started runs with its scopes); without a key
        (no keys, an --api-key key, root), every model; a key revoked since, no model at all."""
        if key_id is None:
            return Principal("batch")
        found = next((p for p in self._current().values() if p.key_id == key_id), None)
        return found or Principal("revoked key", models=())

    def changed(self) -> None:
        """A key was created, revoked or rotated here: reload at the next call."""
        self._loaded = float("-inf")

    def _current(self) -> dict[str, Principal]:
        if time.monotonic() - self._loaded < self.poll:
            return self._stored
        with self._lock:
            if time.monotonic() - self._loaded >= self.poll:
                used, self._used = self._used, {}
                self.store.touch(used)
                self._stored, self._keyed = self.store.live()
                self._loaded = time.monotonic()
        return self._stored
