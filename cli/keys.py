"""`deltagate keys`: a project's scoped keys on a gateway (root: its admin token); `deltagate usage`:
tokens and requests per project, key and model."""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer
from rich.table import Table

from cli.app import GATEWAY, StateDir, Token, Url, admin_client, app, call, console

keys_app = typer.Typer(
    help="Projects' keys: scoped to models, admin over a project's names.", no_args_is_help=True
)
app.add_typer(keys_app, name="keys")


Models = Annotated[
    list[str] | None,
    typer.Option(help="A model it may use: NAME, PREFIX/* or base:BASE (every variant of it); repeat"),
]
Rpm = Annotated[int | None, typer.Option(help="Requests per minute")]
Tpm = Annotated[int | None, typer.Option(help="Tokens (prompt + completion) per minute")]
Concurrent = Annotated[int | None, typer.Option(help="Requests in flight at once")]
PerDay = Annotated[int | None, typer.Option(help="Tokens per UTC day")]
PerMonth = Annotated[int | None, typer.Option(help="Tokens per UTC month")]


LIMITS = ("rpm", "tpm", "concurrent", "tokens_per_day", "tokens_per_month")  # the limit flags, in order


def _set(limits: dict) -> dict[str, int]:
    """The limits that are set (the API shows the others as null)."""
    return {k: v for k, v in limits.items() if v is not None}


def _given(*values: int | None) -> dict[str, int]:
    """The limit flags given (their values in LIMITS' order), by name."""
    return _set(dict(zip(LIMITS, values, strict=True)))


def _changed(given: dict[str, int], no_limits: bool, current) -> dict[str, int] | None:
    """The limits to set: `given` over the current ones (`current()`, read only then), over none with
    --no-limits; None: no limit flag, nothing to change."""
    if not (no_limits or given):
        return None
    return ({} if no_limits else _set(current())) | given


def _said(limits: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in _set(limits).items()) or "no limits"


@keys_app.command("create")
def keys_create(
    project: str,
    name: str,
    model: Models = None,
    admin: Annotated[bool, typer.Option(help="Also manage the project's names (PROJECT/...)")] = False,
    priority: Annotated[str, typer.Option(help="interactive or batch")] = "interactive",
    rpm: Rpm = None,
    tpm: Tpm = None,
    concurrent: Concurrent = None,
    tokens_per_day: PerDay = None,
    tokens_per_month: PerMonth = None,
    url: Url = GATEWAY,
    admin_token: Token = None,
    state_dir: StateDir = None,
) -> None:
    """Create a key in PROJECT; its secret is printed once (on stdout), never stored in clear."""
    body = {"name": name, "models": model, "admin": admin, "priority": priority}  # None: PROJECT/*
    body["limits"] = _given(rpm, tpm, concurrent, tokens_per_day, tokens_per_month)
    key = call(admin_client(url, admin_token, state_dir).post(f"/v1/projects/{project}/keys", json=body))
    console.print(f"created {key['id']} ({project}/{name}) for {', '.join(key['models'])}; its secret:")
    print(key["secret"])


@keys_app.command("list")
def keys_list(
    project: Annotated[str | None, typer.Option(help="Only this project's keys")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
    url: Url = GATEWAY,
    admin_token: Token = None,
    state_dir: StateDir = None,
) -> None:
    """Every key (no secrets): project, name, scopes, created, last used, revoked."""
    path = f"/v1/projects/{project}/keys" if project else "/v1/keys"
    keys = call(admin_client(url, admin_token, state_dir).get(path))["data"]
    if as_json:
        print(json.dumps(keys, indent=2))
        return
    table = Table("id", "project", "name", "models", "admin", "priority", "created", "last used", "revoked")
    for k in keys:
        table.add_row(
            k["id"],
            k["project"],
            k["name"],
            " ".join(k["models"]),
            "yes" if k["admin"] else "",
            k["priority"],
            _when(k["created_at"]),
            _when(k["last_used_at"]),
            _when(k["revoked_at"]),
        )
    console.print(table)


@keys_app.command("update")
def keys_update(
    key_id: str,
    model: Models = None,
    admin: Annotated[
        bool | None, typer.Option("--admin/--no-admin", help="Manage the project's names")
    ] = None,
    priority: Annotated[str | None, typer.Option(help="interactive or batch")] = None,
    rpm: Rpm = None,
    tpm: Tpm = None,
    concurrent: Concurrent = None,
    tokens_per_day: PerDay = None,
    tokens_per_month: PerMonth = None,
    no_limits: Annotated[bool, typer.Option("--no-limits", help="Drop every limit of the key")] = False,
    url: Url = GATEWAY,
    admin_token: Token = None,
    state_dir: StateDir = None,
) -> None:
    """Change a key: models given replace its models; limits given change those limits, keeping the others."""
    client = admin_client(url, admin_token, state_dir)
    given = _given(rpm, tpm, concurrent, tokens_per_day, tokens_per_month)
    limits = _changed(given, no_limits, lambda: call(client.get(f"/v1/keys/{key_id}"))["limits"])
    body = _set({"models": model, "admin": admin, "priority": priority, "limits": limits})
    if not body:
        raise typer.BadParameter("nothing to change: give --model, --admin/--no-admin, --priority or a limit")
    key = call(client.patch(f"/v1/keys/{key_id}", json=body))
    models = ", ".join(key["models"])
    console.print(f"updated {key_id} ({key['project']}/{key['name']}): {models}; {_said(key['limits'])}")


@keys_app.command("project-limits")
def keys_project_limits(
    project: str,
    rpm: Rpm = None,
    tpm: Tpm = None,
    concurrent: Concurrent = None,
    tokens_per_day: PerDay = None,
    tokens_per_month: PerMonth = None,
    no_limits: Annotated[bool, typer.Option("--no-limits", help="Drop every limit of the project")] = False,
    url: Url = GATEWAY,
    admin_token: Token = None,
    state_dir: StateDir = None,
) -> None:
    """Show PROJECT's limits over all its keys, or change them (limits given; the others kept)."""
    client = admin_client(url, admin_token, state_dir)
    path = f"/v1/projects/{project}/limits"
    got = call(client.get(path))
    given = _given(rpm, tpm, concurrent, tokens_per_day, tokens_per_month)
    limits = _changed(given, no_limits, lambda: got["limits"])
    if limits is not None:
        got = call(client.put(path, json=limits))
    console.print(f"project {project}: {_said(got['limits'])} (over all its keys, beside each key's own)")


@keys_app.command("revoke")
def keys_revoke(
    key_id: str, url: Url = GATEWAY, admin_token: Token = None, state_dir: StateDir = None
) -> None:
    """Revoke a key for good."""
    call(admin_client(url, admin_token, state_dir).delete(f"/v1/keys/{key_id}"))
    console.print(f"revoked {key_id}")


@keys_app.command("rotate")
def keys_rotate(
    key_id: str, url: Url = GATEWAY, admin_token: Token = None, state_dir: StateDir = None
) -> None:
    """A new secret for a key (printed once); the old one stops working."""
    key = call(admin_client(url, admin_token, state_dir).post(f"/v1/keys/{key_id}/rotate"))
    console.print(f"rotated {key_id}; its new secret:")
    print(key["secret"])


@app.command("usage")
def usage(
    project: Annotated[str | None, typer.Option(help="Only this project")] = None,
    since: Annotated[
        str | None, typer.Option("--from", help="Unix time or ISO 8601 (default: 31 days ago)")
    ] = None,
    until: Annotated[str | None, typer.Option("--to", help="Unix time or ISO 8601 (default: now)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
    url: Url = GATEWAY,
    admin_token: Token = None,
    state_dir: StateDir = None,
) -> None:
    """Requests and tokens per project, key and model, summed over every gateway of the state database."""
    params = {k: v for k, v in {"project": project, "from": since, "to": until}.items() if v is not None}
    got = call(admin_client(url, admin_token, state_dir).get("/v1/usage", params=params))
    if as_json:
        print(json.dumps(got, indent=2))
        return
    table = Table("project", "key", "model", "requests", "prompt tokens", "completion tokens")
    for u in got["data"]:
        row = (u["requests"], u["prompt_tokens"], u["completion_tokens"])
        table.add_row(u["project"], u["key"], u["model"], *(str(v) for v in row))
    console.print(f"usage from {_when(got['from'])} to {_when(got['to'])}")
    console.print(table)


def _when(at: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) if at else ""
