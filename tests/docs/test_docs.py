"""The hand-written docs (docs/, README.md, examples/) name only routes, flags and metrics the code
still has: the reference pages are generated (docs/hooks/reference.py), and this catches the prose.
`make test` also builds the site with `mkdocs build --strict` (broken links and missing pages fail)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import typer

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted({*ROOT.glob("docs/**/*.md"), ROOT / "README.md", *ROOT.glob("examples/*.py")})
sys.path.insert(0, str(ROOT / "docs" / "hooks"))
import reference  # noqa: E402  (the MkDocs hook that writes the reference pages)

# Routes of the vLLM engines behind the gateway that the docs name when they explain what a swap or
# the adapter lane does there (the gateway does not serve them).
ENGINE_ROUTES = {"/v1/load_lora_adapter", "/v1/unload_lora_adapter"}


def _texts():
    return [(page.relative_to(ROOT), page.read_text()) for page in PAGES]


def test_pages_to_check_exist():
    names = {str(p) for p, _ in _texts()}
    assert {"README.md", "docs/getting-started.md", "examples/chat.py"} <= names


def _route_patterns() -> list[re.Pattern]:
    schema = reference.openapi_schema()
    patterns = []
    for path in schema["paths"]:
        regex = re.sub(r"\{[^}]+\}", "[^/]+", path.rstrip("/"))
        patterns.append(re.compile(regex + "(/.*)?$"))  # a named prefix of a route is one too
    return patterns


def test_documented_routes_exist():
    """Every /v1/… path the pages name is one the app routes (placeholders match any segment)."""
    patterns = _route_patterns()
    missing = []
    for page, text in _texts():
        for path in set(re.findall(r"(?<![\w.:/])/v1/[A-Za-z0-9_./{}$<>…-]*[A-Za-z0-9_}>…]", text)):
            if path in ENGINE_ROUTES:
                continue
            concrete = re.sub(r"(\{[^}]*\}|<[^>]*>|\$\w+|…)", "x", path)
            if not any(p.match(concrete) for p in patterns):
                missing.append(f"{page}: {path}")
    assert not missing, "documented routes the app does not have:\n" + "\n".join(sorted(missing))


def _commands() -> dict[str, set[str]]:
    from cli import app

    group = typer.main.get_command(app)
    ctx = typer.Context(group)
    flags = {}
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        # a group (`deltagate keys create ...`): the flags of any of its subcommands
        subs = (
            [command.get_command(ctx, s) for s in command.list_commands(ctx)]
            if hasattr(command, "list_commands")
            else []
        )
        opts = {o for c in (command, *subs) for p in c.params for o in (*p.opts, *p.secondary_opts)}
        flags[name] = opts | {"--help"}
    return flags


def test_documented_flags_exist():
    """Every --flag on a `deltagate <command>` line of the pages is an option of that command."""
    commands = _commands()
    missing = []
    for page, text in _texts():
        text = text.replace("\\\n", " ")  # shell line continuations
        for line in text.splitlines():
            for match in re.finditer(r"deltagate ([a-z-]+)((?: +[^|;&`#]*)?)", line):
                name, rest = match.group(1), match.group(2)
                if name not in commands:
                    continue
                for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", rest):
                    if flag not in commands[name]:
                        missing.append(f"{page}: deltagate {name} {flag}")
    assert not missing, "documented flags the CLI does not have:\n" + "\n".join(sorted(set(missing)))


def test_documented_commands_exist():
    commands = _commands()
    missing = []
    for page, text in _texts():
        for name in re.findall(r"`deltagate ([a-z][a-z-]*)", text):
            if name not in commands:
                missing.append(f"{page}: deltagate {name}")
    assert not missing, "documented commands the CLI does not have:\n" + "\n".join(sorted(set(missing)))


def test_documented_metrics_exist():
    """Every deltagate_* metric the pages name is one /metrics exports (histogram series included)."""
    page = reference.metrics_page()
    exported = set(re.findall(r"`(deltagate_\w+)`", page))
    series = {f"{m}{s}" for m in exported for s in ("", "_bucket", "_sum", "_count", "_created", "_info")}
    missing = []
    for path, text in _texts():
        for name in set(re.findall(r"\bdeltagate_[a-z_]+[a-z]", text)):
            if name not in series:
                missing.append(f"{path}: {name}")
    assert not missing, "documented metrics /metrics does not export:\n" + "\n".join(sorted(missing))


@pytest.mark.parametrize(
    "page",
    [
        "index.md",
        "models.md",
        "reference/http.md",
        "reference/cli.md",
        "reference/metrics.md",
        "reference/settings.md",
    ],
)
def test_reference_pages_are_generated_not_committed(page):
    assert not (ROOT / "docs" / page).exists(), f"docs/{page} is written by docs/hooks/reference.py"
