"""The bad-input catalogue (tests/server/bad_inputs.py), tried for real: each answer is what it says."""

from tests.server.bad_input_runner import run_all
from tests.server.bad_inputs import CASES


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
