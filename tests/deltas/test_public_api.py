"""deltas/'s public surface: a handful of names, each importable from `deltas`, loaded on first use."""

from __future__ import annotations

import subprocess
import sys

import deltas


def test_every_public_name_resolves_and_is_listed():
    assert set(deltas.__all__) == {"__version__", *deltas._PUBLIC}
    for name in deltas._PUBLIC:
        assert getattr(deltas, name).__name__ == name
    assert deltas.open_artifact.__module__ == "deltas.artifact"


def test_the_version_costs_no_torch_import():
    code = "import sys, deltas; print(deltas.__version__, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == [deltas.__version__, "False"]


def test_an_unknown_name_is_an_attribute_error():
    try:
        deltas.no_such_thing  # noqa: B018
    except AttributeError as exc:
        assert "no_such_thing" in str(exc)
    else:
        raise AssertionError("expected AttributeError")
