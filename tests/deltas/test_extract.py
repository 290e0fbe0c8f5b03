"""Extraction: streamed, verified, refuses mismatches; artifacts detect corruption."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from deltas import (
    CodecPlan,
    IncompatibleError,
    InvalidArtifactError,
    compress_artifact,
    extract_delta,
    merge_tensor,
    open_artifact,
)
from deltas.checkpoint import Checkpoint, content_hash
from deltas.codecs import get_codec
from deltas.codecs.dense import NZ_IDX, NZ_VAL
from deltas.stream_writer import StreamingSafetensorsWriter
from loaders.pico import PicoSpec, make_pico_base, save_checkpoint


def test_artifact_rebuilds_post_exactly(tied):
    art = open_artifact(tied.delta, verify=True)
    base, post = Checkpoint(tied.base), Checkpoint(tied.post)
    for name in base.tensor_names():
        rebuilt = merge_tensor(base.get(name), [(art.delta(name), 1.0)], torch.bfloat16)
        assert torch.equal(rebuilt, post.get(name)), name


def test_manifest_identifies_models_and_carries_side_files(tied):
    m = open_artifact(tied.delta).manifest
    assert m.base.content_hash == content_hash(Checkpoint(tied.base))
    assert m.post.content_hash == content_hash(Checkpoint(tied.post))
    assert m.base.architecture == "LlamaForCausalLM"
    assert m.chat_template == (tied.post / "chat_template.jinja").read_text()
    assert "tokenizer.json" in open_artifact(tied.delta).side_files()
    assert (
        m.generation_config["eos_token_id"]
        == json.loads((tied.post / "config.json").read_text())["eos_token_id"]
    )
    assert {t.name for t in m.tensors} == set(Checkpoint(tied.base).tensor_names())


def test_extract_reads_sharded_checkpoints(tied, tmp_path):
    """A post model split over two shards with an index gives the same delta."""
    sd = load_file(str(tied.post / "model.safetensors"))
    names = sorted(sd)
    sharded = tmp_path / "sharded"
    shutil.copytree(tied.post, sharded)
    (sharded / "model.safetensors").unlink()
    halves = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2 :]}
    weight_map = {}
    for fname, keys in halves.items():
        save_file({k: sd[k] for k in keys}, str(sharded / fname))
        weight_map.update({k: fname for k in keys})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    report = extract_delta(tied.base, sharded, tmp_path / "d.safetensors")
    assert report.tensors == len(names)
    a, b = open_artifact(tmp_path / "d.safetensors"), open_artifact(tied.delta)
    assert all(torch.equal(a.delta(n).dense, b.delta(n).dense) for n in names)


def test_extract_refuses_other_architecture(tied, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tied.post, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(IncompatibleError, match="architecture differs"):
        extract_delta(tied.base, other, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_extract_refuses_other_shape_naming_the_field(tied, tmp_path):
    other = make_pico_base(tmp_path / "wide", PicoSpec(intermediate_size=192), seed=0)
    with pytest.raises(IncompatibleError, match="'intermediate_size' differs"):
        extract_delta(tied.base, other, tmp_path / "x.safetensors")


def test_extract_refuses_other_vocab(tied, tmp_path):
    """A tokenizer trained to 400 tokens has tokens the base's has not: named first."""
    other = make_pico_base(tmp_path / "vocab", PicoSpec(vocab_size=400), seed=0)
    with pytest.raises(IncompatibleError, match="adds 16 tokens to the base's"):
        extract_delta(tied.base, other, tmp_path / "x.safetensors")


def test_extract_refuses_missing_tensor_naming_it(tied, tmp_path):
    sd = load_file(str(tied.post / "model.safetensors"))
    sd.pop("model.layers.1.mlp.up_proj.weight")
    other = save_checkpoint(tmp_path / "missing", sd, like=tied.post)
    with pytest.raises(IncompatibleError, match="mlp.up_proj"):
        extract_delta(tied.base, other, tmp_path / "x.safetensors")


def test_extract_refuses_nan_in_post(tied, tmp_path):
    sd = load_file(str(tied.post / "model.safetensors"))
    sd["model.norm.weight"][3] = float("nan")
    other = save_checkpoint(tmp_path / "nan", sd, like=tied.post)
    with pytest.raises(InvalidArtifactError, match="model.norm.weight.*NaN"):
        extract_delta(tied.base, other, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_truncated_artifact_is_refused(tied, tmp_path):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(tied.delta.read_bytes()[:-1000])
    with pytest.raises(InvalidArtifactError, match="truncated"):
        open_artifact(cut)


def test_flipped_byte_fails_checksum(tied, tmp_path):
    bad = tmp_path / "bad.safetensors"
    data = bytearray(tied.delta.read_bytes())
    data[-100] ^= 0x40
    bad.write_bytes(bytes(data))
    with pytest.raises(InvalidArtifactError, match="checksum"):
        open_artifact(bad, verify=True)


def test_plain_safetensors_is_not_an_artifact(tied):
    with pytest.raises(InvalidArtifactError, match="no deltagate manifest"):
        open_artifact(tied.base / "model.safetensors")


def test_stream_writer_matches_safetensors_reader(tmp_path):
    tensors = {
        "a": torch.randn(3, 5).bfloat16(),
        "b": torch.arange(7, dtype=torch.int32),
        "c": torch.randn(2, 2, 2),
        "empty": torch.zeros(0),
    }
    writer = StreamingSafetensorsWriter(tmp_path / "t.safetensors")
    for k, v in tensors.items():
        writer.add(k, v)
    writer.finish({"k": "v"})
    with safe_open(str(tmp_path / "t.safetensors"), framework="pt") as f:
        assert f.metadata() == {"k": "v"}
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v)
    assert not list(tmp_path.glob(".*"))  # no spool or partial file left behind


def test_stream_writer_abort_leaves_nothing(tmp_path):
    writer = StreamingSafetensorsWriter(tmp_path / "t.safetensors")
    writer.add("a", torch.ones(3))
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_disk_full_during_extraction_leaves_nothing(tied, tmp_path, monkeypatch):
    """ENOSPC while spooling tensors: the error surfaces, and neither the spool nor a partial file stays."""
    import errno

    def full(self, name, tensor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(StreamingSafetensorsWriter, "add", full)
    out = tmp_path / "out" / "delta.safetensors"
    with pytest.raises(OSError, match="No space left"):
        extract_delta(tied.base, tied.post, out)
    assert list(out.parent.iterdir()) == []


def _grow_tokenizer(post, tokens: list[str]) -> None:
    """Add `tokens` to `post`'s tokenizer and resize its embedding, as an instruct model that added
    chat tokens does."""
    tok = json.loads((post / "tokenizer.json").read_text())
    size = len(tok["model"]["vocab"]) + len(tok["added_tokens"])
    for i, content in enumerate(tokens):
        tok["added_tokens"].append({"id": size + i, "content": content, "special": True})
    (post / "tokenizer.json").write_text(json.dumps(tok))
    config = json.loads((post / "config.json").read_text())
    config["vocab_size"] += len(tokens)
    (post / "config.json").write_text(json.dumps(config))
    sd = load_file(str(post / "model.safetensors"))
    emb = sd["model.embed_tokens.weight"]
    sd["model.embed_tokens.weight"] = torch.cat([emb, emb[: len(tokens)]])
    save_file(sd, str(post / "model.safetensors"))


def test_a_post_model_whose_tokenizer_grew_is_refused_naming_the_added_tokens(tied, tmp_path):
    post = tmp_path / "post"
    shutil.copytree(tied.post, post)
    _grow_tokenizer(post, ["<|tool_call|>", "<|tool_result|>"])
    with pytest.raises(
        IncompatibleError, match=r"adds 2 tokens to the base's \('<\|tool_call\|>', '<\|tool_res"
    ):
        extract_delta(tied.base, post, tmp_path / "d.safetensors")
    assert not (tmp_path / "d.safetensors").exists()


def test_tensors_a_fine_tune_left_alone_are_not_stored_and_merge_as_the_base(tied, tmp_path):
    """An attention-only fine-tune: only the attention is stored; merged, every tensor is the post's."""
    base = Checkpoint(tied.base)
    post_sd = {n: base.get(n) for n in base.tensor_names()}
    moved = [n for n in post_sd if ".self_attn." in n]
    for n in moved:
        post_sd[n] = (post_sd[n].float() * 1.5).to(post_sd[n].dtype)
    post = save_checkpoint(tmp_path / "post", post_sd, like=tied.base)
    report = extract_delta(tied.base, post, tmp_path / "d.safetensors")
    art = open_artifact(tmp_path / "d.safetensors", verify=True)
    assert sorted(art.tensor_names) == sorted(moved) and report.unchanged == len(post_sd) - len(moved)
    assert art.manifest.post.content_hash == content_hash(Checkpoint(post))  # the whole post model's identity
    with pytest.raises(InvalidArtifactError, match="equals its base"):
        extract_delta(tied.base, tied.base, tmp_path / "same.safetensors")


def test_a_delta_of_mostly_exact_zeros_is_stored_sparse_and_rebuilds_exactly(tied, tmp_path):
    """GMT-like: a tenth of each MLP entry moved, the rest frozen. Those tensors are stored as their
    nonzero entries (smaller; format v3), rebuild the post model bit for bit, and are copied as they
    are by `compress`; a tensor that moved everywhere stays full; the layout can be forced."""
    base = Checkpoint(tied.base)
    post_sd = {n: base.get(n) for n in base.tensor_names()}
    g = torch.Generator().manual_seed(0)
    masked = [n for n in post_sd if ".mlp." in n]
    for n in masked:
        keep = torch.rand(post_sd[n].shape, generator=g) < 0.1
        post_sd[n] = torch.where(keep, post_sd[n].float() * 1.5 + 0.01, post_sd[n].float()).to(
            post_sd[n].dtype
        )
    everywhere = "model.layers.0.self_attn.q_proj.weight"
    post_sd[everywhere] = (post_sd[everywhere].float() + 0.01).to(post_sd[everywhere].dtype)
    post = save_checkpoint(tmp_path / "post", post_sd, like=tied.base)
    extract_delta(tied.base, post, tmp_path / "sparse.safetensors")  # verifies base + Δ == post
    extract_delta(tied.base, post, tmp_path / "full.safetensors", plan=CodecPlan.uniform("dense:layout=full"))
    sparse, full = (
        open_artifact(tmp_path / "sparse.safetensors", verify=True),
        open_artifact(tmp_path / "full.safetensors"),
    )
    assert {e.name for e in sparse.manifest.tensors if e.params == {"layout": "sparse"}} == set(masked)
    assert sparse.manifest.tensor(everywhere).params == {}  # full: recorded as before the layout existed
    assert sparse.manifest.format_version == 3 and full.manifest.format_version == 1
    assert (tmp_path / "sparse.safetensors").stat().st_size < 0.6 * (
        tmp_path / "full.safetensors"
    ).stat().st_size
    for name in masked + [everywhere]:
        assert torch.equal(sparse.delta(name).full(), full.delta(name).full()), name
    compress_artifact(tmp_path / "sparse.safetensors", tmp_path / "copied.safetensors", CodecPlan())
    copied = open_artifact(tmp_path / "copied.safetensors", verify=True)
    assert [e.params for e in copied.manifest.tensors] == [e.params for e in sparse.manifest.tensors]


def test_a_sparse_payload_out_of_range_is_refused(tied, tmp_path):
    codec = get_codec("dense", {"layout": "sparse"})
    payload = {NZ_IDX: torch.tensor([0, 7], dtype=torch.int32), NZ_VAL: torch.ones(2, dtype=torch.bfloat16)}
    assert torch.equal(codec.decode(payload, [2, 4]).full().flatten()[[0, 7]], torch.ones(2))
    payload[NZ_IDX] = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(InvalidArtifactError, match="out of range"):
        codec.decode(payload, [2, 4])
