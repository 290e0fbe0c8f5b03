"""Gradient-mask tuning: masked entries stay exactly still under AdamW, and the delta it leaves is
stored by `deltagate extract` as what it is, mostly exact zeros (pico, seconds)."""

import torch

from deltas import Checkpoint, extract_delta, open_artifact
from loaders.pico import PicoSpec, make_pico_base
from server.evals.addition import addition_split
from training.gmt import GMTConfig, gmt_finetune, masked_step


def test_a_masked_step_leaves_masked_entries_and_their_moments_exactly_as_they_were():
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.1)
    for step in range(3):  # after the first step AdamW's moments would move every entry
        layer(torch.randn(4, 16)).square().sum().backward()
        before = layer.weight.detach().clone()
        state = opt.state.get(layer.weight, {})
        moments = {k: state[k].clone() for k in ("exp_avg", "exp_avg_sq") if k in state}
        mask = masked_step(opt, keep=0.25)[layer.weight]
        opt.zero_grad()
        assert 0 < int(mask.sum()) <= round(0.25 * mask.numel()) + 1  # ties at the threshold may add one
        assert torch.equal(layer.weight[~mask], before[~mask])  # bit-equal: values...
        for key, old in moments.items():  # ...and both moments
            assert torch.equal(opt.state[layer.weight][key][~mask], old[~mask]), (step, key)
        assert not torch.equal(layer.weight[mask], before[mask])


def test_gmt_leaves_a_delta_of_mostly_exact_zeros_that_extract_stores_sparse(tmp_path):
    base = make_pico_base(tmp_path / "base", PicoSpec(dtype="float32"), seed=0)
    cfg = GMTConfig(steps=2, batch_size=2, lr=1e-3, keep=0.05, seed=0)
    report = gmt_finetune(base, tmp_path / "gmt", addition_split(8, seed=0), cfg, log=lambda _: None)
    assert 0 < report["updated_share"] <= 2 * 0.05 + 0.01  # at most the union of two steps' masks
    extract_delta(base, tmp_path / "gmt", tmp_path / "gmt.delta")
    artifact = open_artifact(tmp_path / "gmt.delta")
    b, p = Checkpoint(base), Checkpoint(tmp_path / "gmt")
    moved = sum(int((b.get(n) != p.get(n)).sum()) for n in b.tensor_names())
    total = sum(b.get(n).numel() for n in b.tensor_names())
    assert 0 < moved / total <= report["updated_share"]  # the delta's exact density
    layouts = {e.params.get("layout") for e in artifact.manifest.tensors}
    assert layouts == {"sparse"}, layouts  # each stored as its nonzero entries
