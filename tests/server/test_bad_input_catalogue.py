"""The README's table of bad inputs (bench/bad_inputs.py), re-run: each answer is what it says."""

from bench.bad_inputs import CASES, run_all


def test_every_bad_input_gets_its_documented_answer(tmp_path):
    rows = run_all(tmp_path, log=lambda line: None)
    assert len(rows) >= 40
    wrong = [
        f"{case.kind} / {case.what}: expected {case.expect} with {case.fragment!r}, got {status}: {message}"
        for case, status, message in rows
        if status != case.expect or case.fragment not in message
    ]
    assert not wrong, "\n".join(wrong)
    assert all(400 <= s < 500 or case.cli for case, s, _ in rows)  # never a 5xx
    assert len({case.what for case in CASES}) == len(CASES)
