"""Engine-side pure functions: the merged tensor stream and the tied-module repair."""

import pytest
import torch

from deltas import Checkpoint, DeltaTerm, IncompatibleError, Recipe
from loaders.merge import check_recipe, merged_tensors
from loaders.pico import PicoSpec, make_pico_base, make_pico_post
from loaders.worker_extension import reprocess_tied_modules


def test_merged_stream_with_alpha_one_is_the_post_model(tied):
    post = Checkpoint(tied.post)
    stream = dict(merged_tensors(Recipe(base=str(tied.base), deltas=[DeltaTerm(path=str(tied.delta))])))
    assert stream.keys() == set(post.tensor_names())
    assert all(torch.equal(stream[n], post.get(n)) for n in stream)


def test_plain_recipe_streams_the_base(tied):
    base = Checkpoint(tied.base)
    assert all(torch.equal(t, base.get(n)) for n, t in merged_tensors(Recipe(base=str(tied.base))))


def test_check_recipe_names_the_mismatching_tensor(tied, tmp_path):
    from deltas import extract_delta

    wide = make_pico_base(tmp_path / "b", PicoSpec(intermediate_size=192), seed=0)
    extract_delta(wide, make_pico_post(wide, tmp_path / "p", seed=1), tmp_path / "w.safetensors")
    with pytest.raises(IncompatibleError, match="down_proj"):
        check_recipe(Recipe(base=str(tied.base), deltas=[DeltaTerm(path=str(tmp_path / "w.safetensors"))]))


class _Method:
    def __init__(self):
        self.calls = 0

    def process_weights_after_loading(self, module):
        self.calls += 1


def test_only_modules_sharing_a_weight_are_reprocessed():
    model = torch.nn.Module()
    model.embed = torch.nn.Linear(4, 4, bias=False)
    model.head = torch.nn.Linear(4, 4, bias=False)
    model.head.weight = model.embed.weight  # tied
    model.other = torch.nn.Linear(4, 4, bias=False)
    for m in (model.embed, model.head, model.other):
        m.quant_method = _Method()
    assert sorted(reprocess_tied_modules(model)) == ["embed", "head"]
    assert model.other.quant_method.calls == 0
