"""Admin (root): a project's keys, created with their scopes, listed, changed, revoked and rotated;
a project's own limits."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from server.deps import GatewayDep, require_root
from server.quota import Limits
from server.tenancy import KeyCreate, KeyCreated, KeyPublic, KeyUpdate, ProjectLimits

router = APIRouter(prefix="/v1", tags=["admin"], dependencies=[Depends(require_root)])


@router.post("/projects/{project}/keys", status_code=201)
async def create_key(project: str, body: KeyCreate, gateway: GatewayDep) -> KeyCreated:
    """A new key of `project` with its scopes; the secret is in this answer only (stored hashed)."""
    created = gateway.keys.store.create(project, body)
    gateway.keys.changed()
    return created


@router.get("/projects/{project}/keys")
async def list_project_keys(project: str, gateway: GatewayDep) -> dict:
    """The project's keys (no secrets), revoked ones included."""
    return {"object": "list", "data": gateway.keys.store.list(project)}


@router.get("/keys")
async def list_keys(gateway: GatewayDep) -> dict:
    """Every project's keys (no secrets)."""
    return {"object": "list", "data": gateway.keys.store.list()}


@router.get("/keys/{key_id}")
async def get_key(key_id: str, gateway: GatewayDep) -> KeyPublic:
    return gateway.keys.store.get(key_id)


@router.patch("/keys/{key_id}")
async def update_key(key_id: str, body: KeyUpdate, gateway: GatewayDep) -> KeyPublic:
    """Change a key's models, admin scope, priority class or limits (each field given replaces the
    key's); every gateway of a shared database follows within a poll."""
    updated = gateway.keys.store.update(key_id, body)
    gateway.keys.changed()
    return updated


@router.get("/projects/{project}/limits")
async def get_project_limits(project: str, gateway: GatewayDep) -> ProjectLimits:
    """The project's limits over all its keys (beside each key's own)."""
    return gateway.keys.store.project_limits(project)


@router.put("/projects/{project}/limits")
async def set_project_limits(project: str, body: Limits, gateway: GatewayDep) -> ProjectLimits:
    """Set (replace) the project's limits: every request of its keys counts in them, and in its key's."""
    limits = gateway.keys.store.set_project_limits(project, body)
    gateway.keys.changed()
    return limits


@router.delete("/keys/{key_id}")
async def revoke_key(key_id: str, gateway: GatewayDep) -> KeyPublic:
    """Revoke a key: refused here at once, on other gateways of a shared database within a poll."""
    revoked = gateway.keys.store.revoke(key_id)
    gateway.keys.changed()
    return revoked


@router.post("/keys/{key_id}/rotate")
async def rotate_key(key_id: str, gateway: GatewayDep) -> KeyCreated:
    """A new secret for the key (shown once); the old one stops working."""
    rotated = gateway.keys.store.rotate(key_id)
    gateway.keys.changed()
    return rotated
