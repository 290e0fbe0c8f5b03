"""The gateway settings as CLI options: one typer option per GatewaySettings field, generated, so a
setting cannot lack its flag or its help (server/settings.py is the one declaration)."""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from pydantic.fields import FieldInfo

from cli.app import fail
from server.settings import GatewaySettings


def flag_of(name: str, field: FieldInfo) -> str | None:
    """The option a setting is given by (`--swap-quantum`), or None for one set from other flags."""
    extra = field.json_schema_extra or {}
    if not extra.get("cli", True):
        return None
    return "--" + (extra.get("flag") or name.replace("_", "-"))


def setting_flags() -> dict[str, str]:
    """Each setting that has a flag: field name -> flag."""
    fields = GatewaySettings.model_fields.items()
    return {name: flag for name, field in fields if (flag := flag_of(name, field))}


def _bound(field: FieldInfo, kind: str) -> float | None:
    for item in field.metadata:
        if hasattr(item, kind):
            return getattr(item, kind)
    return None


def _default(field: FieldInfo) -> Any:
    """The default a flag and the docs show; none for one computed where the gateway runs (the state
    dir under the user's home: its help says how)."""
    default = field.get_default(call_default_factory=True)
    return None if isinstance(default, Path) and field.default_factory is not None else default


def _option(name: str, field: FieldInfo) -> inspect.Parameter:
    """The typer parameter of one setting: type, default, help, bounds and choices from the field."""
    annotation, default = field.annotation, _default(field)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (types.UnionType, typing.Union):  # `float | None`
        annotation = args[0] if len(args) == 1 else annotation
    if typing.get_origin(annotation) is list:
        annotation, default = list[typing.get_args(annotation)[0]] | None, None
    extra = field.json_schema_extra or {}
    flag = flag_of(name, field)
    if annotation is bool:  # a switch: --x turns it on, --no-x off (a default of True needs the second)
        flag = f"{flag}/--no-{flag[2:]}"
    option = typer.Option(
        flag,
        help=field.description,
        min=_bound(field, "ge") if _bound(field, "ge") is not None else _bound(field, "gt"),
        hidden=bool(extra.get("hidden")),
        show_default=default not in (None, "", False) and not isinstance(default, list),
    )
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[annotation, option]
    )


def with_settings(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give `command` an option per setting; it is called with `settings` (a GatewaySettings of the
    flags given, the rest from DELTAGATE_* variables or the defaults) instead of those options."""
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "settings"]
    generated = [_option(name, GatewaySettings.model_fields[name]) for name in setting_flags()]
    context = inspect.Parameter("_ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
    params = [context] + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + generated

    @functools.wraps(command)
    def wrapper(_ctx: typer.Context, **values: Any) -> Any:
        given = {}
        for name in setting_flags():
            value = values.pop(name)
            # Only what the command line gave: pydantic-settings reads DELTAGATE_* for the rest, so an
            # environment variable is parsed one way (lists as JSON) whoever starts the gateway.
            source = _ctx.get_parameter_source(name)
            if source is not None and source.name == "COMMANDLINE":
                given[name] = value
        try:
            settings = GatewaySettings(**given)
        except ValidationError as exc:
            raise fail(_explain(exc)) from None
        return command(settings=settings, **values)

    wrapper.__signature__ = inspect.Signature(params)  # what typer reads
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    del wrapper.__wrapped__  # typer must see the generated signature, not the command's
    return wrapper


def _explain(exc: ValidationError) -> str:
    """A settings error in the CLI's words: the flag (or variable) and what was wrong."""
    flags = setting_flags()
    parts = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else ""
        message = error["msg"].removeprefix("Value error, ")
        if not field:  # a rule between settings: its message names the flags
            parts.append(message)
            continue
        parts.append(f"{flags.get(field) or f'DELTAGATE_{field.upper()}'}: {message}")
    return "; ".join(parts)


def settings_reference() -> list[dict[str, str]]:
    """Each setting as the docs list it: name, flag, environment variable, type, default, help."""
    rows = []
    for name, field in GatewaySettings.model_fields.items():
        default = _default(field)
        if isinstance(default, Path):
            default = str(default)
        rows.append(
            {
                "setting": name,
                "flag": flag_of(name, field) or "",
                "env": f"DELTAGATE_{name.upper()}",
                "type": _type_name(field.annotation),
                "default": "" if default in (None, []) else repr(default),
                "help": field.description or "",
            }
        )
    return rows


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    text = getattr(annotation, "__name__", None) if not typing.get_args(annotation) else None
    return text or str(annotation).replace("typing.", "").replace("server.settings.", "")
