"""The addition task: seeded, held-out pairs disjoint from training pairs, exact scoring."""

from server.evals.addition import AdditionExample, addition_split, score


def test_splits_are_seeded_and_disjoint():
    train, held = addition_split(500, seed=0), addition_split(100, seed=0, held_out=True)
    assert train == addition_split(500, seed=0)
    assert not {(e.a, e.b) for e in train} & {(e.a, e.b) for e in held}


def test_score_is_exact_match_of_first_integer():
    ex = AdditionExample(12, 30)
    assert score("42", ex) and score("The answer is 42.", ex)
    assert not score("4 2", ex) and not score("420", ex) and not score("no idea", ex)
