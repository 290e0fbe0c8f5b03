"""Checking a base checkpoint and deciding whether an engine's base can hot-load another one."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltas import InvalidArtifactError
from deltas.checkpoint import Checkpoint, check_checkpoint, serving_difference, vocabulary_digest
from loaders.pico import PicoSpec, make_pico_base


def _copy(src, tmp_path, name="copy"):
    out = tmp_path / name
    shutil.copytree(src, out)
    return out


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del config[key]
    (path / "config.json").write_text(json.dumps(config))


def test_a_pico_base_passes_and_its_updated_version_fits_its_engine(tied, tied_updated):
    check_checkpoint(Checkpoint(tied_updated))
    assert serving_difference(Checkpoint(tied.base), Checkpoint(tied_updated)) is None


def test_other_layouts_are_named(tied, untied, tmp_path):
    problem = serving_difference(Checkpoint(tied.base), Checkpoint(untied.base))
    assert "tie_word_embeddings" in problem  # the first differing config field
    rope = _copy(tied.base, tmp_path, "rope")
    _edit_config(rope, rope_theta=12345.0)  # same shapes, other computation: needs its own engine
    assert "'rope_theta'" in serving_difference(Checkpoint(tied.base), Checkpoint(rope))
    renamed = _copy(tied.base, tmp_path, "renamed")
    _edit_config(renamed, _name_or_path="elsewhere", transformers_version="9.9")
    assert serving_difference(Checkpoint(tied.base), Checkpoint(renamed)) is None
    fp32 = _copy(tied.base, tmp_path, "fp32")
    sd = {k: v.float() for k, v in load_file(str(fp32 / "model.safetensors")).items()}
    save_file(sd, str(fp32 / "model.safetensors"))
    assert "F32" in serving_difference(Checkpoint(tied.base), Checkpoint(fp32))


def test_another_tokenizer_does_not_fit(tied, tmp_path):
    other = _copy(tied.base, tmp_path)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    a, b = sorted(tokenizer["model"]["vocab"])[:2]
    vocab = tokenizer["model"]["vocab"]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert "tokenizer" in serving_difference(Checkpoint(tied.base), Checkpoint(other))
    assert vocabulary_digest(Checkpoint(other).side_files()) != vocabulary_digest(
        Checkpoint(tied.base).side_files()
    )


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("no_vocab_size", "no 'vocab_size'"),
        ("bad_json", "config.json is not valid JSON"),
        ("int_tensor", "must be floating point"),
        ("rows", "rows, config.json says vocab_size"),
        ("no_tokenizer", "no tokenizer"),
        ("garbage_weights", "weights are unreadable"),
        ("tokenizer_without_vocab", "tokenizer.json has no readable vocabulary"),
        ("quantized", r"the checkpoint is quantized \(awq\): deltas are added onto unquantized weights"),
    ],
)
def test_broken_checkpoints_are_refused_naming_the_problem(tmp_path, breakage, message):
    path = make_pico_base(tmp_path / "base", PicoSpec(num_layers=1))
    weights = path / "model.safetensors"
    if breakage == "no_vocab_size":
        _edit_config(path, vocab_size=None)
    elif breakage == "bad_json":
        (path / "config.json").write_text("{not json")
    elif breakage in ("int_tensor", "rows"):
        sd = load_file(str(weights))
        name = "model.embed_tokens.weight"
        sd[name] = sd[name].to(torch.int32) if breakage == "int_tensor" else sd[name][:-1].contiguous()
        save_file(sd, str(weights))
    elif breakage == "no_tokenizer":
        (path / "tokenizer.json").unlink()
    elif breakage == "quantized":
        _edit_config(path, quantization_config={"quant_method": "awq", "bits": 4})
    elif breakage == "garbage_weights":
        weights.write_bytes(b"\xff" * 64)
    else:
        (path / "tokenizer.json").write_text(json.dumps({"model": {}}))
    with pytest.raises(InvalidArtifactError, match=message):
        check_checkpoint(Checkpoint(path))
