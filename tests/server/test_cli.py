"""The deltagate CLI: extract, inspect, merge, and clear errors naming the problem."""

import json
import shutil
import subprocess
import sys

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from deltas.artifact import open_artifact
from server.cli import app
from server.cli.serve import parse_variant

runner = CliRunner()


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "server", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("serve", "extract", "inspect", "merge", "demo"):
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
