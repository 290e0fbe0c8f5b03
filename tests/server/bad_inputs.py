"""The catalogue of bad inputs: each one, where it goes (an HTTP request, an upload, a recipe, a CLI
call) and what a user should get (status or exit code, and a fragment of the message), with the
pico checkpoints and broken files the cases point at. tests/server/bad_input_runner.py tries them
for real; tests/server/test_bad_input_catalogue.py checks every answer.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ADMIN, KEY = "bad-inputs-admin", "bad-inputs-key"
MAX_BODY, MAX_UPLOAD = 100_000, 2_000_000


@dataclass
class Fixtures:
    """Files the cases point at."""

    tmp: Path
    base: Path
    delta: Path
    wide_delta: Path
    other_arch_delta: Path
    truncated: Path
    tampered: Path
    nan_delta: Path
    plain_safetensors: Path
    url: str = ""


@dataclass
class Case:
    """One bad input: where it goes, and what the user should get (status or exit code, message)."""

    kind: str
    what: str
    expect: int
    fragment: str
    http: Callable[[Fixtures], dict] | None = None  # kwargs of httpx.request
    cli: Callable[[Fixtures], list[str]] | None = None
    setup: Callable[[Fixtures], None] = field(default=lambda fx: None)


def _admin(**kw) -> dict:
    return {"headers": {"Authorization": f"Bearer {ADMIN}", **kw.pop("headers", {})}, **kw}


def _infer(**kw) -> dict:
    return {"headers": {"Authorization": f"Bearer {KEY}", **kw.pop("headers", {})}, **kw}


def _completion(**body) -> dict:
    return _infer(method="POST", url="/v1/completions", json={"model": "pico", "prompt": "hi", **body})


def _upload(name: str | None, content: bytes, ctype: str = "application/octet-stream") -> dict:
    url = "/v1/deltas" + (f"?name={name}" if name else "")
    return _admin(method="POST", url=url, content=content, headers={"content-type": ctype})


def _register(name: str, path: Callable[[Fixtures], Path]) -> Callable[[Fixtures], dict]:
    return lambda fx: _admin(method="POST", url="/v1/deltas", json={"name": name, "path": str(path(fx))})


def _variant(**body) -> Callable[[Fixtures], dict]:
    full = {"name": "v", "base": "pico", "deltas": [{"delta": "inst"}], **body}
    return lambda fx: _admin(method="POST", url="/v1/variants", json=full)


def _yaml(text: str) -> Callable[[Fixtures], list[str]]:
    def args(fx: Fixtures) -> list[str]:
        recipe = fx.tmp / "recipe.yaml"
        recipe.write_text(text.format(base=fx.base, delta=fx.delta))
        return ["merge", "--recipe", str(recipe), "-o", str(fx.tmp / "merged")]

    return args


def _raw(content: str) -> dict:
    return _infer(
        method="POST", url="/v1/completions", content=content, headers={"content-type": "application/json"}
    )


def _path(attr: str) -> Callable[[Fixtures], Path]:
    return lambda fx: getattr(fx, attr)


CASES: list[Case] = [
    # inference requests
    Case("request", "no body", 422, "body", http=lambda fx: _raw("")),
    Case("request", "body is not JSON", 422, "JSON", http=lambda fx: _raw("{")),
    Case("request", "body is a JSON array", 422, "Input should be an object", http=lambda fx: _raw("[1, 2]")),
    Case("request", "no `model`", 422, "model: Field required", http=lambda fx: _raw('{"prompt": "hi"}')),
    Case(
        "request", "unknown model", 404, "unknown model 'ghost'", http=lambda fx: _completion(model="ghost")
    ),
    Case("request", "`model` is a number", 422, "model", http=lambda fx: _completion(model=7)),
    Case("request", "`stream` is not a boolean", 422, "stream", http=lambda fx: _completion(stream="often")),
    Case("request", "`max_tokens` = -1", 400, "max_tokens", http=lambda fx: _completion(max_tokens=-1)),
    Case("request", "`max_tokens` = 10⁹", 400, "max_tokens", http=lambda fx: _completion(max_tokens=10**9)),
    Case("request", "5 stop strings", 400, "stop", http=lambda fx: _completion(stop=list("abcde"))),
    Case(
        "request",
        "client-supplied `chat_template`",
        400,
        "chat_template",
        http=lambda fx: _infer(
            method="POST",
            url="/v1/chat/completions",
            json={"model": "pico", "messages": [], "chat_template": "{{ x }}"},
        ),
    ),
    Case(
        "request",
        f"body over --max-body-bytes ({MAX_BODY})",
        413,
        "max-body-bytes",
        http=lambda fx: _completion(prompt="x" * (MAX_BODY + 1)),
    ),
    Case(
        "request",
        "no API key",
        401,
        "API key",
        http=lambda fx: {"method": "POST", "url": "/v1/completions", "json": {"model": "pico"}},
    ),
    Case(
        "request",
        "the admin token as API key",
        401,
        "API key",
        http=lambda fx: {
            "method": "POST",
            "url": "/v1/completions",
            "json": {"model": "pico"},
            "headers": {"Authorization": f"Bearer {ADMIN}"},
        },
    ),
    Case(
        "request",
        "GET on a POST route",
        405,
        "Method Not Allowed",
        http=lambda fx: _infer(method="GET", url="/v1/completions"),
    ),
    Case(
        "request",
        "unknown route",
        404,
        "Not Found",
        http=lambda fx: _infer(method="POST", url="/v1/embeddings"),
    ),
    Case(
        "request",
        "/tokenize for an unknown model",
        404,
        "unknown model",
        http=lambda fx: _infer(method="POST", url="/tokenize", json={"model": "ghost", "prompt": "hi"}),
    ),
    Case(
        "request",
        "/tokenize with a non-string model",
        422,
        "model",
        http=lambda fx: _infer(method="POST", url="/tokenize", json={"model": 3, "prompt": "hi"}),
    ),
    # uploads
    Case("upload", "no `?name=`", 400, "needs the delta's name", http=lambda fx: _upload(None, b"x")),
    Case("upload", "name `../x`", 400, "invalid name", http=lambda fx: _upload("../x", b"x")),
    Case(
        "upload",
        "wrong content type",
        400,
        "application/octet-stream",
        http=lambda fx: _upload("t", b"x", "text/plain"),
    ),
    Case("upload", "empty body", 422, "uploaded artifact 'empty'", http=lambda fx: _upload("empty", b"")),
    Case(
        "upload",
        "random bytes",
        422,
        "not a readable safetensors file",
        http=lambda fx: _upload("r", b"\x00" * 64),
    ),
    Case(
        "upload",
        "truncated artifact",
        422,
        "uploaded artifact 'trunc'",
        http=lambda fx: _upload("trunc", fx.truncated.read_bytes()),
    ),
    Case(
        "upload", "artifact with a NaN", 422, "NaN", http=lambda fx: _upload("nan", fx.nan_delta.read_bytes())
    ),
    Case(
        "upload",
        f"over --max-upload-bytes ({MAX_UPLOAD})",
        413,
        "max-upload-bytes",
        http=lambda fx: _upload("big", b"\x00" * (MAX_UPLOAD + 1)),
    ),
    Case(
        "upload",
        "a name already registered",
        409,
        "exists",
        http=lambda fx: _upload("inst", fx.delta.read_bytes()),
    ),
    Case(
        "upload",
        "safetensors header claiming 2⁶³ bytes",
        422,
        "not a readable safetensors file",
        http=lambda fx: _upload("hdr", (2**63 - 1).to_bytes(8, "little") + b"{}"),
    ),
    # artifacts registered by path
    Case(
        "artifact",
        "path does not exist",
        422,
        "no such delta file",
        http=_register("a1", lambda fx: fx.tmp / "no"),
    ),
    Case("artifact", "path is a directory", 422, "is a directory", http=_register("a2", _path("tmp"))),
    Case(
        "artifact",
        "a checkpoint, not a delta",
        422,
        "no deltagate manifest",
        http=_register("a3", _path("plain_safetensors")),
    ),
    Case(
        "artifact",
        "tensor bytes changed after extraction",
        422,
        "does not match its checksum",
        http=_register("a4", _path("tampered")),
    ),
    Case(
        "artifact",
        "truncated file",
        422,
        "not a readable safetensors file",
        http=_register("a5", _path("truncated")),
    ),
    Case(
        "artifact",
        "file changed after registration",
        409,
        "changed since it was registered",
        setup=lambda fx: _touch_registered(fx),
        http=lambda fx: _completion(model="v-touched"),
    ),
    # variant recipes
    Case("recipe", "unknown delta", 404, "unknown delta 'ghost'", http=_variant(deltas=[{"delta": "ghost"}])),
    Case("recipe", "unknown base", 404, "unknown base 'ghost'", http=_variant(base="ghost")),
    Case(
        "recipe",
        "alpha is not a number",
        422,
        "alpha",
        http=_variant(deltas=[{"delta": "inst", "alpha": "x"}]),
    ),
    Case(
        "recipe",
        "alpha = 1e309 (inf)",
        422,
        "finite",
        http=lambda fx: _admin(
            method="POST",
            url="/v1/variants",
            headers={"content-type": "application/json"},
            content='{"name": "v", "base": "pico", "deltas": [{"delta": "inst", "alpha": 1e309}]}',
        ),
    ),
    Case("recipe", "density = 0", 422, "density", http=_variant(deltas=[{"delta": "inst", "density": 0}])),
    Case("recipe", "no deltas", 422, "deltas", http=_variant(deltas=[])),
    Case("recipe", "unknown merge method", 422, "method", http=_variant(method="average")),
    Case("recipe", "unknown field", 422, "Extra inputs", http=_variant(colour="blue")),
    Case("recipe", "name with a space", 422, "names are", http=_variant(name="a b")),
    Case("recipe", "name taken by the base", 409, "taken", http=_variant(name="pico")),
    Case(
        "recipe",
        "delta of another shape",
        422,
        "model.layers.0.mlp",
        setup=lambda fx: _add(fx, "wide", "wide_delta"),
        http=_variant(deltas=[{"delta": "wide"}]),
    ),
    Case(
        "recipe",
        "delta of another architecture",
        422,
        "MistralForCausalLM",
        setup=lambda fx: _add(fx, "mistral", "other_arch_delta"),
        http=_variant(deltas=[{"delta": "mistral"}]),
    ),
    Case("recipe", "lane adapter without LoRA slots", 400, "no LoRA slots", http=_variant(lane="adapter")),
    Case(
        "recipe",
        "delete a delta a variant uses",
        409,
        "used by variants",
        http=lambda fx: _admin(method="DELETE", url="/v1/deltas/inst"),
    ),
    # bases
    Case(
        "base",
        "not a checkpoint directory",
        400,
        "not a checkpoint directory",
        http=lambda fx: _admin(method="POST", url="/v1/bases", json={"name": "b", "path": "/nowhere"}),
    ),
    Case(
        "base",
        "another layout, attached engines",
        400,
        "fits no running engine",
        http=lambda fx: _admin(
            method="POST", url="/v1/bases", json={"name": "b", "path": str(fx.wide_delta.parent / "base")}
        ),
    ),
    Case(
        "base",
        "a checkpoint quantized on disk",
        422,
        "the checkpoint is quantized (gptq)",
        setup=lambda fx: _quantized_copy(fx),
        http=lambda fx: _admin(
            method="POST", url="/v1/bases", json={"name": "b", "path": str(fx.tmp / "gptq")}
        ),
    ),
    Case(
        "base",
        "delete a start-up base",
        409,
        "command line",
        http=lambda fx: _admin(method="DELETE", url="/v1/bases/pico"),
    ),
    # evals
    Case(
        "eval",
        "unknown built-in task",
        422,
        "task",
        http=lambda fx: _admin(
            method="POST",
            url="/v1/evals",
            json={"name": "e", "data_source": {"type": "builtin", "task": "mmlu"}},
        ),
    ),
    Case(
        "eval",
        "jsonl without a prompt",
        422,
        "prompt template",
        http=lambda fx: _admin(
            method="POST",
            url="/v1/evals",
            json={"name": "e", "data_source": {"type": "jsonl", "content": '{"q": 1}'}},
        ),
    ),
    Case(
        "eval",
        "empty perplexity corpus",
        422,
        "no items",
        http=lambda fx: _admin(
            method="POST",
            url="/v1/evals",
            json={
                "name": "eval",
                "data_source": {"type": "perplexity", "content": ""},
                "testing_criteria": [],
            },
        ),
    ),
    # YAML recipe files (deltagate merge --recipe)
    Case("yaml", "not a mapping", 2, "recipe", cli=_yaml("- just\n- a list\n")),
    Case("yaml", "unknown key", 2, "mergeit", cli=_yaml("mergeit: ties\nbase_model: {base}\ndeltas: []\n")),
    Case(
        "yaml",
        "weight is a word",
        2,
        "weight",
        cli=_yaml("base_model: {base}\ndeltas:\n  - delta: {delta}\n    parameters: {{weight: heavy}}\n"),
    ),
    Case("yaml", "invalid YAML", 2, "invalid YAML at line", cli=_yaml("base_model: [unclosed\n")),
    # CLI arguments
    Case(
        "cli",
        "serve --max-lora-rank 7",
        2,
        "--max-lora-rank: must be one of",
        cli=lambda fx: ["serve", "--base", str(fx.base), "--max-lora-rank", "7"],
    ),
    Case(
        "cli",
        "serve --engine-url for an unknown base",
        2,
        "unknown bases",
        cli=lambda fx: ["serve", "--base", f"pico={fx.base}", "--engine-url", "other=http://x"],
    ),
    Case(
        "cli",
        "merge --delta with a bad alpha",
        2,
        "expected DELTA_FILE[:ALPHA[:DENSITY]]",
        cli=lambda fx: [
            "merge",
            "--base",
            str(fx.base),
            "--delta",
            f"{fx.delta}:heavy",
            "-o",
            str(fx.tmp / "m"),
        ],
    ),
    Case(
        "cli",
        "extract from a missing base",
        2,
        "config.json",
        cli=lambda fx: [
            "extract",
            "--base",
            str(fx.tmp / "no"),
            "--post",
            str(fx.base),
            "-o",
            str(fx.tmp / "d"),
        ],
    ),
]


def _add(fx: Fixtures, name: str, attr: str) -> None:
    r = httpx.post(fx.url + "/v1/deltas", **_admin(json={"name": name, "path": str(getattr(fx, attr))}))
    assert r.status_code in (201, 409), r.text


def _quantized_copy(fx: Fixtures) -> None:
    """The base as a GPTQ export names itself (its weights left as they are: refused on the config)."""
    if not (fx.tmp / "gptq").exists():
        shutil.copytree(fx.base, fx.tmp / "gptq")
        config = json.loads((fx.tmp / "gptq" / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
        (fx.tmp / "gptq" / "config.json").write_text(json.dumps(config))


def _touch_registered(fx: Fixtures) -> None:
    """Register a copy of the delta under a variant, then rewrite the file behind the gateway's back."""
    copy = fx.tmp / "touched.safetensors"
    shutil.copy(fx.delta, copy)
    assert (
        httpx.post(fx.url + "/v1/deltas", **_admin(json={"name": "touched", "path": str(copy)})).status_code
        == 201
    )
    body = {"name": "v-touched", "base": "pico", "deltas": [{"delta": "touched"}]}
    assert httpx.post(fx.url + "/v1/variants", **_admin(json=body)).status_code == 201
    copy.write_bytes(copy.read_bytes() + b" ")


def make_fixtures(tmp: Path) -> Fixtures:
    """Pico checkpoints and every broken file the catalogue needs."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from deltas import extract_delta
    from deltas.artifact import payload_sha256
    from deltas.manifest import MANIFEST_KEY, DeltaManifest
    from loaders.pico import PicoSpec, make_pico_base, make_pico_post

    base = make_pico_base(tmp / "base", PicoSpec(), seed=0)
    extract_delta(base, make_pico_post(base, tmp / "post", seed=1), tmp / "inst.safetensors")  # delta "inst"
    wide = make_pico_base(tmp / "wide" / "base", PicoSpec(intermediate_size=192), seed=0)
    extract_delta(
        wide, make_pico_post(wide, tmp / "wide" / "post", seed=1), tmp / "wide" / "delta.safetensors"
    )
    for which in ("base", "post"):
        shutil.copytree(tmp / "wide" / which, tmp / "mistral" / which)
        config = json.loads((tmp / "mistral" / which / "config.json").read_text())
        config["architectures"] = ["MistralForCausalLM"]
        (tmp / "mistral" / which / "config.json").write_text(json.dumps(config))
    extract_delta(tmp / "mistral" / "base", tmp / "mistral" / "post", tmp / "mistral.safetensors")
    data = (tmp / "inst.safetensors").read_bytes()
    (tmp / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    with safe_open(str(tmp / "inst.safetensors"), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    first = sorted(tensors)[0]
    tampered = dict(tensors)
    tampered[first] = tampered[first].clone()
    tampered[first].view(-1)[0] += 1
    save_file(tampered, str(tmp / "tampered.safetensors"), metadata=metadata)
    nan = dict(tensors)  # checksums right, values NaN
    nan[first] = nan[first].clone()
    nan[first].view(-1)[0] = math.nan
    manifest = DeltaManifest.model_validate_json(metadata[MANIFEST_KEY])
    for entry in manifest.tensors:
        keys = [k for k in nan if k == entry.name or k.startswith(entry.name + "::")]
        if first in keys:
            entry.sha256 = payload_sha256({k: nan[k] for k in keys})
    save_file(
        nan, str(tmp / "nan.safetensors"), metadata={**metadata, MANIFEST_KEY: manifest.model_dump_json()}
    )
    return Fixtures(
        tmp,
        base,
        tmp / "inst.safetensors",
        tmp / "wide" / "delta.safetensors",
        tmp / "mistral.safetensors",
        tmp / "truncated.safetensors",
        tmp / "tampered.safetensors",
        tmp / "nan.safetensors",
        base / "model.safetensors",
    )
