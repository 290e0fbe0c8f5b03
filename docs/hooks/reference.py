"""MkDocs hook: the pages written from the code at build time, so they cannot drift.

index.md is README.md with its links made relative to docs/ (one landing page, two places).

reference/http.md (and openapi.json) from the app's OpenAPI schema, reference/cli.md from the typer
app, reference/metrics.md from the gateway's Prometheus registry, reference/settings.md from
GatewaySettings, models.md from the model matrix's declarations (loaders/families.py), which
tests/server/test_model_matrix.py serves row by row. tests/docs/test_docs.py checks that the
hand-written pages name only routes, flags and metrics these still have.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from mkdocs.structure.files import File, Files

GENERATED = "<!-- generated from the code by docs/hooks/reference.py at build time: do not edit -->\n\n"


def on_files(files: Files, config) -> Files:
    """Add the generated reference pages to the site."""
    schema = openapi_schema()
    pages = {
        "reference/http.md": http_page(schema),
        "reference/openapi.json": json.dumps(schema, indent=2),
        "reference/cli.md": cli_page(),
        "reference/metrics.md": metrics_page(),
        "reference/settings.md": settings_page(),
        "models.md": models_page(),
        "index.md": home_page(Path(config["docs_dir"]).parent / "README.md"),
    }
    for uri, content in pages.items():
        files.append(File.generated(config, uri, content=content))
    return files


def home_page(readme: Path) -> str:
    """The README as the site's home: `docs/x.md` links become `x.md`, CHANGELOG.md the changelog page."""
    text = readme.read_text().replace("](docs/", "](").replace("](CHANGELOG.md)", "](changelog.md)")
    return GENERATED + text


def openapi_schema() -> dict:
    """The gateway's OpenAPI schema, from an app built on an empty state dir (nothing starts)."""
    from server.app import create_app
    from server.settings import GatewaySettings

    with tempfile.TemporaryDirectory() as state:
        return create_app(GatewaySettings(state_dir=Path(state), admin_token="docs")).openapi()


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip()


def _schema_name(schema: dict) -> str:
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in schema:
        return " or ".join(_schema_name(s) for s in schema["anyOf"])
    if schema.get("type") == "array":
        return f"list of {_schema_name(schema.get('items', {}))}"
    return schema.get("type", "any")


def http_page(schema: dict) -> str:
    """Every route by tag: method, path, what it does, who may call it, parameters, body, answers."""
    auth = {"admin": "admin token", "evals": "admin token"}
    tags: dict[str, list[str]] = {}
    for path, methods in sorted(schema["paths"].items()):
        for method, op in methods.items():
            tag = (op.get("tags") or ["other"])[0]
            lines = [f"### `{method.upper()} {path}`", ""]
            if op.get("description") or op.get("summary"):
                lines += [op.get("description") or op["summary"], ""]
            if tag in auth:
                lines += [f"Needs the {auth[tag]} (`Authorization: Bearer …`).", ""]
            params = op.get("parameters", [])
            if params:
                lines += ["| parameter | in | type | required |", "|---|---|---|---|"]
                for p in params:
                    kind = _schema_name(p.get("schema", {}))
                    lines.append(
                        f"| `{p['name']}` | {p['in']} | {kind} | {'yes' if p.get('required') else ''} |"
                    )
                lines.append("")
            body = op.get("requestBody", {}).get("content", {})
            for ctype, content in body.items():
                lines += [f"Body ({ctype}): {_schema_name(content.get('schema', {}))}", ""]
            answers = ", ".join(
                f"{code} {_md(r.get('description', ''))}" for code, r in op["responses"].items()
            )
            lines += [f"Answers: {answers}", ""]
            tags.setdefault(tag, []).extend(lines)
    out = [
        GENERATED + "# HTTP API",
        "",
        "Every route of the gateway, from its OpenAPI schema ([openapi.json](openapi.json); a running "
        "gateway also serves it at `/openapi.json` and an explorer at `/docs`). Request and answer "
        "models are in the schema's `components`.",
        "",
    ]
    for tag in sorted(tags):
        out += [f"## {tag}", "", *tags[tag]]
    return "\n".join(out)


def cli_page() -> str:
    """`deltagate --help` and every command's options, as typer renders them."""
    import typer
    from typer.cli import get_docs_for_click

    from cli import app

    command = typer.main.get_command(app)
    text = get_docs_for_click(obj=command, ctx=typer.Context(command), name="deltagate", title="CLI")
    return GENERATED + text


def metrics_page() -> str:
    """Every metric the gateway exports at /metrics: name, type, labels, help."""
    from prometheus_client.metrics import MetricWrapperBase

    from server.metrics import EngineState, Metrics

    metrics = Metrics("docs")
    metrics.watch_engines(lambda: [EngineState("e", "v", ("v",), 0)])
    rows = []
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            suffix = "_total" if value._type == "counter" else ""
            rows.append((value._name + suffix, value._type, value._labelnames, value._documentation))
    for family in metrics.registry.collect():
        if family.name not in {r[0].removesuffix("_total") for r in rows}:
            labels = tuple(family.samples[0].labels) if family.samples else ()
            rows.append((family.name, family.type, labels, family.documentation))
    out = [
        GENERATED + "# Metrics",
        "",
        "What the gateway exports at `/metrics` (Prometheus text format), from its registry. Each "
        "engine's own vLLM metrics are relayed at `/metrics/engines/{engine}`. How to scrape and "
        "chart them: [Observe](../guides/observe.md).",
        "",
        "| metric | type | labels | help |",
        "|---|---|---|---|",
    ]
    for name, kind, labels, doc in sorted(rows):
        out.append(f"| `{name}` | {kind} | {', '.join(labels)} | {_md(doc)} |")
    return "\n".join(out) + "\n"


def settings_page() -> str:
    """Every gateway setting: its flag, its environment variable, type, default and help."""
    from cli.options import settings_reference

    out = [
        GENERATED + "# Settings",
        "",
        "Every setting of `deltagate serve` (and `deltagate demo`), from `GatewaySettings` "
        "(`server/settings.py`), the one place they are declared. Each is a flag or a `DELTAGATE_*` "
        "environment variable; a flag wins. List settings take a JSON list in their variable.",
        "",
    ]
    for row in settings_reference():
        out += [f"### `{row['flag']}`" if row["flag"] else f"### {row['setting']} (no flag of its own)", ""]
        facts = [f"`{row['env']}`", row["type"]]
        if row["default"]:
            facts.append(f"default `{row['default']}`")
        out += [" · ".join(facts), "", row["help"], ""]
    return "\n".join(out) + "\n"


def models_page() -> str:
    """Supported models: the model matrix's rows and paths (what make test serves), what is refused
    and why, what was not run."""
    from loaders.families import (
        ADAPTER_PATHS,
        ADAPTERS_ELSEWHERE,
        FAMILIES,
        MATRIX,
        NOT_RUN,
        PATHS,
        REFUSED,
        SHARED_PATHS,
        adapter_lane,
        commit_modules,
    )

    out = [
        GENERATED + "# Supported models",
        "",
        "Every row below is served by `make test` (`tests/server/test_model_matrix.py`): a tiny "
        "checkpoint of the family built offline from its `transformers` config, a base and three "
        "post models, deltas from `deltagate extract`, one gateway and one vLLM engine per row taking "
        "every path in turn. Each answer (greedy tokens and their logprobs, three prompts) is compared "
        "with stock vLLM cold-started on the offline merge (`deltagate merge`) with the same flags: "
        "all bit-identical.",
        "",
        "The commit column says which modules a swap commits from the kernel form it prepared while "
        "serving and which vLLM's reload rewrites in the pause ([Swaps](concepts/swaps.md)); the row "
        "checks it from the swap records.",
        "",
        "| family | architecture | dtype | quantization | commit | what it has that Llama does not |",
        "|---|---|---|---|---|---|",
    ]
    for row in MATRIX:
        family = FAMILIES[row.family]
        method = row.vllm_quantization[0]
        quant = f"`--quantization {method}` ({row.quantization}, at load)" if method else "none"
        out.append(
            f"| {row.family} | `{family.architecture}` | {row.dtype} | {quant} | {_md(commit_modules(row))} "
            f"| {_md(family.why)} |"
        )
    out += ["", "## Paths verified on every row", "", "| path | what |", "|---|---|"]
    out += [f"| {name} | {_md(what)} |" for name, what in PATHS.items()]
    shared = ", ".join(row.family for row in MATRIX if row.shared)
    out += [f"| {name} | {_md(what)} (on the {shared} row) |" for name, what in SHARED_PATHS.items()]
    lane = ", ".join(f.name for f in FAMILIES.values() if adapter_lane(f))
    moe = ", ".join(f.name for f in FAMILIES.values() if f.moe)
    elsewhere = "; ".join(f"{family}: checked on {where}" for family, where in ADAPTERS_ELSEWHERE.items())
    out += [
        "",
        "## The adapter lane",
        "",
        f"On the rows of {lane}, a second gateway with `--lora-slots 2` takes these paths, each "
        "answer bit-identical to stock vLLM with the same multi-LoRA flags given the same adapter "
        f"(LoRA's numerics, not the merge's: [Lanes](concepts/lanes.md)). {elsewhere} (vLLM builds "
        f"them from the same LoRA-wrapped layers; a test pins it). {moe}: refused on vLLM's CPU build "
        "(below).",
        "",
        "| path | what |",
        "|---|---|",
    ]
    out += [f"| {name} | {_md(what)} |" for name, what in ADAPTER_PATHS.items()]
    out += ["", "## Refused, with the reason", "", "| what | why |", "|---|---|"]
    out += [f"| {_md(what)} | {_md(why)} |" for what, why in REFUSED.items()]
    out += ["", "## Not run here", "", "| what | why |", "|---|---|"]
    out += [f"| {_md(what)} | {_md(why)} |" for what, why in NOT_RUN.items()]
    return "\n".join(out) + "\n"
