"""The deltagate CLI: extract, inspect, merge, and clear errors naming the problem."""

import json
import os
import shutil
import subprocess
import sys

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cli import app
from cli.serve import parse_variant
from deltas import open_artifact

runner = CliRunner()


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("serve", "extract", "compress", "inspect", "merge", "export-lora", "fidelity", "demo"):
        assert cmd in out.stdout


def test_extract_then_inspect(tied, tmp_path):
    out = tmp_path / "d.safetensors"
    r = runner.invoke(app, ["extract", "--base", str(tied.base), "--post", str(tied.post), "-o", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["tensors"] == len(open_artifact(out).manifest.tensors)
    assert report["corrections"] == open_artifact(out).manifest.total_corrections
    r = runner.invoke(app, ["inspect", str(out)])
    assert r.exit_code == 0, r.output
    assert "model.layers.0.self_attn.q_proj.weight" in r.stdout and "LlamaForCausalLM" in r.stdout
    r = runner.invoke(app, ["inspect", "--json", str(out)])
    assert json.loads(r.stdout)["format_version"] == 1


def test_extract_error_names_the_field(tied, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tied.post, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (other / "config.json").write_text(json.dumps(cfg))
    r = runner.invoke(
        app, ["extract", "--base", str(tied.base), "--post", str(other), "-o", str(tmp_path / "x")]
    )
    assert r.exit_code == 2
    assert "num_hidden_layers" in r.output


def test_inspect_refuses_a_corrupt_file(tied, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(tied.delta.read_bytes()[:100])
    r = runner.invoke(app, ["inspect", str(bad)])
    assert r.exit_code == 2 and "truncated" in r.output


def test_merge_with_alpha_one_rebuilds_post(tied, tmp_path):
    r = runner.invoke(
        app, ["merge", "--base", str(tied.base), "--delta", f"{tied.delta}:1.0", "-o", str(tmp_path / "m")]
    )
    assert r.exit_code == 0, r.output
    merged, post = (
        load_file(str(tmp_path / "m/model.safetensors")),
        load_file(str(tied.post / "model.safetensors")),
    )
    assert merged.keys() == post.keys()
    assert all(torch.equal(merged[k], post[k]) for k in post)
    # the merged checkpoint speaks with the post model's chat template
    assert (tmp_path / "m/chat_template.jinja").read_text() == (tied.post / "chat_template.jinja").read_text()


def test_parse_variant_flag():
    v = parse_variant("mix=a.safetensors:0.5,b")
    assert v.name == "mix"
    assert [(t.ref, t.alpha) for t in v.terms] == [("a.safetensors", 0.5), ("b", 1.0)]


def test_extract_with_codec_recipe_and_zstd(tied, tmp_path):
    recipe = tmp_path / "codecs.yaml"
    recipe.write_text(
        "default: int4:group=64\nrules:\n  - match: '*embed_tokens*'\n    codec: int8\nzstd: true\n"
    )
    out = tmp_path / "q.safetensors"
    args = ["extract", "--base", str(tied.base), "--post", str(tied.post), "-o", str(out)]
    r = runner.invoke(app, [*args, "--codec-recipe", str(recipe)])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["lossless"] is False and 0 < report["max_rel_error"] < 0.2
    entries = {t.name: t for t in open_artifact(out, verify=True).manifest.tensors}
    assert entries["model.embed_tokens.weight"].encoding == "int8"
    assert entries["model.layers.0.mlp.up_proj.weight"].params == {"group": 64}
    assert entries["model.norm.weight"].encoding == "dense"
    assert all(t.compression == "zstd" for t in entries.values())
    r = runner.invoke(app, ["inspect", str(out)])
    assert r.exit_code == 0 and "int4:group=64+zstd" in r.stdout


def test_compress_with_gradient_selection(tied, tmp_path):
    calib = tmp_path / "calib.jsonl"
    rows = [
        {"text": "The capital of France is Paris."},
        {"prompt": "def add(a, b):", "completion": " return a+b"},
    ]
    calib.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out, mag = tmp_path / "g.safetensors", tmp_path / "m.safetensors"
    sparse = ["--codec", "sparse:density=0.05"]
    gradient = ["--select", "gradient", "--calib", str(calib), "--base", str(tied.base)]
    r = runner.invoke(app, ["compress", str(tied.delta), "-o", str(out), *sparse, *gradient])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["compress", str(tied.delta), "-o", str(mag), "--codec", "sparse:density=0.05"])
    assert r.exit_code == 0, r.output
    g, m = open_artifact(out, verify=True), open_artifact(mag, verify=True)
    name = "model.layers.0.mlp.up_proj.weight"
    assert g.manifest.tensor(name).params["select"] == "gradient"
    kept_g, kept_m = g.delta(name).full() != 0, m.delta(name).full() != 0
    assert kept_g.sum() == kept_m.sum() and not torch.equal(kept_g, kept_m)  # same budget, other entries


def test_codec_errors_are_named(tied, tmp_path):
    out = str(tmp_path / "x.safetensors")
    r = runner.invoke(app, ["compress", str(tied.delta), "-o", out, "--codec", "int5"])
    assert r.exit_code == 2 and "unknown codec 'int5'" in r.output
    r = runner.invoke(
        app, ["compress", str(tied.delta), "-o", out, "--codec", "sparse", "--select", "gradient"]
    )
    assert r.exit_code == 2 and "--calib" in r.output
    r = runner.invoke(
        app, ["compress", str(tied.delta), "-o", out, "--codec", "lowrank", "--select", "gradient"]
    )
    assert r.exit_code == 2 and "sparse" in r.output


def test_merge_with_yaml_recipe(tied, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: ties\nbase_model: {tied.base}\ndeltas:\n  - delta: {tied.delta}\n"
        f"    parameters: {{weight: 0.5, density: 0.5}}\n  - delta: {tied.delta2}\n"
    )
    r = runner.invoke(app, ["merge", "--recipe", str(recipe), "-o", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    assert "ties" in r.output and (tmp_path / "m" / "model.safetensors").is_file()
    recipe.write_text("merge_method: slerp\ndeltas: [{delta: a}]\n")
    r = runner.invoke(app, ["merge", "--recipe", str(recipe), "-o", str(tmp_path / "m2")])
    assert r.exit_code == 2 and "merge_method" in r.output


def test_errors_are_never_wrapped(tied, tmp_path):
    """An error naming a long path stays one line on a 40-column terminal or a pipe (issue 8)."""
    deep = tmp_path / ("x" * 120) / ("y" * 60)
    deep.mkdir(parents=True)
    bad = deep / "bad [v2].safetensors"  # brackets: no rich markup may eat them
    bad.write_bytes(tied.delta.read_bytes()[:100])
    env = {**os.environ, "COLUMNS": "40", "LINES": "10"}
    for extra_env in ({}, {"TERM": "dumb"}):
        done = subprocess.run(
            [sys.executable, "-m", "cli", "inspect", str(bad)],
            capture_output=True,
            text=True,
            env={**env, **extra_env},
        )
        assert done.returncode == 2
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert lines[0].startswith("error: ") and str(bad) in lines[0] and "truncated" in lines[0]
