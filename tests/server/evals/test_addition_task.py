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


def test_the_built_in_eval_scores_addition_as_the_training_clients_do():
    """One score for the task: the built-in `addition` eval's grader is `score`'s."""
    from server.evals.tasks import BuiltinSource, builtin_task

    task = builtin_task(BuiltinSource(type="builtin", task="addition"))
    item = task.items[0]
    a, b = (int(n) for n in item["question"].split("What is ")[1].split("?")[0].split(" + "))
    for reply in (item["answer"], f"It is {item['answer']}.", "4 2", "no idea", item["answer"] + "0"):
        graded = all(g.grade(item, {"output_text": reply}) for g in task.graders)
        assert graded == score(reply, AdditionExample(a, b)), reply
