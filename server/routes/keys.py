"""Admin (root): a project's keys, created with their scopes, listed, revoked and rotated."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from server.deps import GatewayDep, require_root
from server.tenancy import KeyCreate, KeyCreated, KeyPublic

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
