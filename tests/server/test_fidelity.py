"""`deltagate fidelity`: the math on known distributions, refusals, and one real served run."""

import json
import math
import subprocess
import sys

import pytest

from deltas import open_artifact
from loaders.fidelity import compare, kl_topk, tensor_errors
from tests.server.conftest import deltagate


def _dist(probs: dict[int, float]) -> dict[int, float]:
    return {t: math.log(p) for t, p in probs.items()}


def test_kl_of_identical_distributions_is_zero():
    p = _dist({1: 0.5, 2: 0.3, 3: 0.1})
    assert kl_topk(p, p) == pytest.approx(0.0, abs=1e-12)


def test_kl_matches_the_closed_form_on_a_full_support():
    p, q = _dist({1: 0.7, 2: 0.3}), _dist({1: 0.4, 2: 0.6})
    expected = 0.7 * math.log(0.7 / 0.4) + 0.3 * math.log(0.3 / 0.6)
    assert kl_topk(p, q) == pytest.approx(expected, rel=1e-9)


def test_compare_counts_top1_agreement_per_position():
    a, b = _dist({1: 0.6, 2: 0.4}), _dist({1: 0.4, 2: 0.6})
    result = compare([[a, a, b]], [[a, b, b]])
    assert result.positions == 3 and result.agreement == pytest.approx(2 / 3)
    assert result.mean_kl > 0


def test_tensor_errors_are_zero_for_a_copy_and_positive_for_lossy(tied, tmp_path):
    deltagate("compress", tied.delta, "-o", tmp_path / "copy.safetensors", "--codec", "dense")
    deltagate("compress", tied.delta, "-o", tmp_path / "q.safetensors", "--codec", "int4")
    ref = open_artifact(tied.delta)
    assert all(e.rel_error == 0 for e in tensor_errors(open_artifact(tmp_path / "copy.safetensors"), ref))
    lossy = tensor_errors(open_artifact(tmp_path / "q.safetensors"), ref)
    assert any(e.rel_error > 0 for e in lossy if e.encoding == "int4")


def test_fidelity_refuses_artifacts_of_different_deltas(tied, tmp_path):
    deltagate("compress", tied.delta2, "-o", tmp_path / "other.safetensors", "--codec", "int8")
    cmd = [
        sys.executable,
        "-m",
        "cli",
        "fidelity",
        str(tmp_path / "other.safetensors"),
        "--reference",
        str(tied.delta),
        "--no-served",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 2 and "different post models" in done.stderr


@pytest.mark.engine
def test_fidelity_on_a_served_model(tied, tmp_path):
    """bitdelta on the pico delta: measurably lossy, every number in range."""
    deltagate("compress", tied.delta, "-o", tmp_path / "b.safetensors", "--codec", "bitdelta")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "The capital of France"}\n{"text": "def add(a, b):"}\n')
    done = deltagate(
        "fidelity",
        tmp_path / "b.safetensors",
        "--reference",
        tied.delta,
        "--prompts",
        prompts,
        "--max-tokens",
        "8",
        "--json",
    )
    result = json.loads(done.stdout)
    served = result["served"]
    assert 0 < served["positions"] <= 2 * 8  # greedy runs may stop early at EOS
    assert 0.0 <= served["agreement"] <= 1.0 and served["mean_kl"] > 0
    assert {t["encoding"] for t in result["tensors"]} == {"bitdelta", "dense"}
    assert max(t["rel_error"] for t in result["tensors"]) > 0.1
