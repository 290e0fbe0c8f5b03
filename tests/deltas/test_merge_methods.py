"""Merge methods against an independent, element-by-element reference (numpy, float64)."""

import numpy as np
import pytest
import torch

from deltas import RecipeFile
from deltas.merge_methods import MergeTerm, get_method
from deltas.mix import Delta, merge_tensor
from deltas.sparsify import random_mask

SHAPE = (6, 7)


def _deltas(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*SHAPE, generator=g) for _ in range(n)]


def reference(method, deltas, weights, densities, *, normalize, seed=0, name="t"):
    """Textbook TIES / DARE / task arithmetic, one element at a time."""
    taus = []
    for i, (d, k) in enumerate(zip(deltas, densities, strict=True)):
        d = d.double().numpy().copy()
        if method == "ties" and k < 1:
            order = np.argsort(-np.abs(d).ravel(), kind="stable")
            keep = np.zeros(d.size, bool)
            keep[order[: max(1, round(k * d.size))]] = True
            d = d * keep.reshape(d.shape)
        elif method.startswith("dare") and k < 1:
            d = d * random_mask(d.shape, k, seed, f"{name}#{i}").numpy() / k
        taus.append(d)
    consensus = method in ("ties", "dare_ties")
    out = np.zeros(SHAPE)
    for j in np.ndindex(*SHAPE):
        vals = [w * t[j] for w, t in zip(weights, taus, strict=True)]
        if consensus:
            elected = 1.0 if sum(vals) >= 0 else -1.0
            chosen = [i for i, v in enumerate(vals) if np.sign(v) == elected]
            num, den = sum(vals[i] for i in chosen), sum(weights[i] for i in chosen)
            den = den if den != 0 else 1.0
        else:
            num, den = sum(vals), sum(weights)
            den = den if abs(den) >= 1e-8 else 1.0
        out[j] = num / den if normalize else num
    return torch.from_numpy(out)


CASES = [
    ("linear", [0.5, 1.0, -0.3], [1, 1, 1], False),
    ("linear", [0.5, 1.0, 0.5], [1, 1, 1], True),
    ("ties", [1.0, 0.6, 0.8], [0.5, 0.3, 0.9], True),
    ("ties", [1.0, -0.6, 0.8], [0.5, 0.3, 1.0], False),
    ("dare_linear", [0.7, 0.3, 1.0], [0.5, 0.8, 0.3], False),
    ("dare_linear", [0.7, 0.3, 1.0], [0.5, 0.8, 0.3], True),
    ("dare_ties", [1.0, 1.0, 0.5], [0.4, 0.6, 0.5], False),
    ("dare_ties", [1.0, 1.0, 0.5], [0.4, 0.6, 0.5], True),
]


@pytest.mark.parametrize("method,weights,densities,normalize", CASES)
def test_method_matches_reference(method, weights, densities, normalize):
    deltas = _deltas()
    seeded = {"seed": 3} if method.startswith("dare") else {}  # only dare_* take a seed
    impl = get_method(method, normalize=normalize, **seeded)
    terms = [MergeTerm(Delta.of(d), w, k) for d, w, k in zip(deltas, weights, densities, strict=True)]
    base = torch.zeros(SHAPE)
    got = merge_tensor(base, impl.combine("t", terms), torch.float32).double()
    expected = reference(method, deltas, weights, densities, normalize=normalize, seed=3)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_ties_drops_minority_signs():
    a, b = torch.tensor([[1.0, -2.0]]), torch.tensor([[3.0, 1.0]])
    impl = get_method("ties", normalize=False)
    out = merge_tensor(
        torch.zeros(1, 2),
        impl.combine("t", [MergeTerm(Delta.of(a), 1, 1), MergeTerm(Delta.of(b), 1, 1)]),
        torch.float32,
    )
    assert out.tolist() == [[4.0, -2.0]]  # column 2: -2 + 1 elects "−", the +1 is dropped


def test_dare_depends_on_seed_and_tensor_name():
    d = _deltas(1)
    terms = [MergeTerm(Delta.of(d[0]), 1.0, 0.5)]
    one = get_method("dare_linear", seed=1).combine("a", terms)[0][0].dense
    again = get_method("dare_linear", seed=1).combine("a", terms)[0][0].dense
    other_seed = get_method("dare_linear", seed=2).combine("a", terms)[0][0].dense
    other_name = get_method("dare_linear", seed=1).combine("b", terms)[0][0].dense
    assert torch.equal(one, again) and not torch.equal(one, other_seed) and not torch.equal(one, other_name)


def test_linear_keeps_the_exactness_terms():
    d = Delta(torch.zeros(4), torch.tensor([1]), torch.tensor([0.5]))
    [(out, alpha)] = get_method("linear").combine("t", [MergeTerm(d, 1.0)])
    assert out is d and alpha == 1.0


def test_yaml_recipe_mergekit_style(tmp_path):
    (tmp_path / "r.yaml").write_text(
        "merge_method: dare_ties\nbase_model: base\nseed: 4\nparameters: {normalize: true}\n"
        "deltas:\n  - delta: a.safetensors\n    parameters: {weight: 0.7, density: 0.5}\n"
        "  - delta: /abs/b.safetensors\n"
    )
    recipe = RecipeFile.load(tmp_path / "r.yaml").to_recipe(relative_to=tmp_path)
    assert recipe.method == "dare_ties" and recipe.normalize is True and recipe.seed == 4
    assert recipe.base == str(tmp_path / "base")
    assert [(t.path, t.alpha, t.density) for t in recipe.deltas] == [
        (str(tmp_path / "a.safetensors"), 0.7, 0.5),
        ("/abs/b.safetensors", 1.0, 1.0),
    ]


@pytest.mark.parametrize(
    "text,problem",
    [
        ("merge_method: slerp\ndeltas: [{delta: a}]\n", "merge_method"),
        ("deltas: [{delta: a, parameters: {density: 1.5}}]\n", "density"),
        ("deltas: []\n", "deltas"),
        ("deltas: [{delta: a, parameters: {wieght: 1}}]\n", "wieght"),
        ("deltas: [{delta: a, parameters: {density: 0.5}}]\n", "linear ignores density"),
        ("merge_method: ties\nseed: 3\ndeltas: [{delta: a}]\n", "ties ignores seed"),
    ],
)
def test_bad_yaml_recipes_name_the_field(tmp_path, text, problem):
    from deltas import DeltaError

    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(DeltaError, match=problem):
        RecipeFile.load(tmp_path / "r.yaml")


def test_the_registry_is_the_one_list_of_methods_and_their_parameters():
    from typing import get_args

    from deltas.errors import MergeMethodError
    from deltas.merge_methods import METHODS, MethodName

    assert get_args(MethodName) == tuple(METHODS)
    with pytest.raises(MergeMethodError, match="unknown merge method 'slerp'; known: linear, ties, dare"):
        get_method("slerp")
    with pytest.raises(MergeMethodError, match="'linear': bad parameters.*seed"):
        get_method("linear", seed=1)
    assert get_method("ties").normalize is True and get_method("linear").normalize is False
    assert get_method("dare_ties", seed=7).params.seed == 7


def test_recipe_key_survives_the_engine_round_trip_and_normalises():
    """The slot compares the key of what it sent with the key of the JSON the engine hands back."""
    from deltas.recipe import DeltaTerm, Recipe, RecipeKey

    sent = Recipe(base="/m/base", deltas=[DeltaTerm(path="/d/a.safetensors", alpha=0.5)], method="ties")
    back = Recipe.model_validate_json(sent.model_dump_json())
    assert isinstance(sent.key(), RecipeKey) and back.key() == sent.key()
    assert hash(back.key()) == hash(sent.key())
    # the same file spelled another way, the method's default written out: the same weights
    same = Recipe(
        base="/m//./base",
        deltas=[DeltaTerm(path="/d/x/../a.safetensors", alpha=0.5, density=1)],
        method="ties",
        normalize=True,
    )
    assert same.key() == sent.key()
    assert Recipe(base="/m/base").key() == Recipe(base="/m/base", method="linear", normalize=False).key()
    uri = Recipe(base="/m/base", deltas=[DeltaTerm(path="s3://bucket//a")])
    assert uri.key().terms[0][0] == "s3://bucket//a"  # a URI is kept as written
    a6 = [DeltaTerm(path="/d/a.safetensors", alpha=0.6)]
    assert Recipe(base="/m/base", deltas=a6, method="ties").key() != sent.key()
    assert Recipe(base="/m/base", deltas=sent.deltas).key() != sent.key()  # linear, not ties
