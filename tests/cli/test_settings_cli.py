"""The settings are declared once (GatewaySettings); `deltagate serve` and `demo` get an option per
setting from it, with its help and bounds. A flag, then a DELTAGATE_* variable, then the default."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from cli import app
from cli import serve as serve_module
from cli.options import flag_of, setting_flags
from server.settings import GatewaySettings


def _options(command: str) -> dict[str, object]:
    group = typer.main.get_command(app)
    cmd = group.get_command(typer.Context(group), command)
    return {opt: p for p in cmd.params for opt in p.opts}


@pytest.mark.parametrize("command", ["serve", "demo"])
def test_every_setting_has_a_flag_with_its_help(command):
    options = _options(command)
    for name, field in GatewaySettings.model_fields.items():
        flag = flag_of(name, field)
        if flag is None:  # set from other flags, which the help names
            assert command == "demo" or all(
                f in options for f in __import__("re").findall(r"--[a-z-]+", field.description)
            )
            continue
        assert flag in options, f"setting {name} has no {flag} on `deltagate {command}`"
        assert options[flag].help == field.description


@pytest.fixture
def started(monkeypatch, tmp_path):
    """What `serve` would start the gateway with (nothing starts)."""
    seen = {}
    monkeypatch.setattr(
        serve_module, "run_gateway", lambda settings, *a: seen.__setitem__("settings", settings)
    )
    monkeypatch.chdir(tmp_path)
    return seen


def test_a_flag_beats_the_environment_which_beats_the_default(started, monkeypatch):
    monkeypatch.setenv("DELTAGATE_SWAP_QUANTUM", "5")
    monkeypatch.setenv("DELTAGATE_ENGINE_ARGS", '["--enforce-eager"]')
    monkeypatch.setenv("DELTAGATE_API_KEYS", "k1 k2")
    result = CliRunner().invoke(
        app, ["serve", "--base", "b=/models/b", "--swap-max-wait", "7", "--swap-residency", "device"]
    )
    assert result.exit_code == 0, result.output
    settings = started["settings"]
    assert (settings.swap_quantum, settings.swap_max_wait, settings.swap_residency) == (5.0, 7.0, "device")
    assert settings.engine_args == ["--enforce-eager"] and settings.api_keys == ["k1", "k2"]
    assert settings.lora_slots == GatewaySettings.model_fields["lora_slots"].default
    assert [b.name for b in settings.bases] == ["b"]

    result = CliRunner().invoke(
        app,
        [
            "serve",
            "--base",
            "b=/m",
            "--swap-quantum",
            "0.5",
            "--api-key",
            "x",
            "--engine-arg=--max-num-seqs=4",
        ],
    )
    assert result.exit_code == 0, result.output
    settings = started["settings"]
    assert (settings.swap_quantum, settings.api_keys, settings.engine_args) == (
        0.5,
        ["x"],
        ["--max-num-seqs=4"],
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-lora-rank", "3"], "--max-lora-rank: must be one of 1, 8, 16"),
        (["--kv-cache-gib", "0"], "--kv-cache-gib: Input should be greater than 0"),
        (["--swap-residency", "disk"], "Invalid value for '--swap-residency'"),
        (["--swap-quantum", "-1"], "Invalid value for '--swap-quantum'"),
    ],
)
def test_a_bad_setting_is_a_cli_error_naming_the_flag(started, args, message):
    result = CliRunner().invoke(app, ["serve", "--base", "b=/m", *args])
    assert result.exit_code == 2 and "settings" not in started
    # typer draws usage errors in a box as wide as the terminal (COLUMNS=40 in CI): read it unboxed
    flat = "".join(result.output.replace("│", "").split())
    assert "".join(message.split()) in flat, result.output


def test_flags_are_the_settings_names():
    flags = setting_flags()
    assert flags["swap_quantum"] == "--swap-quantum" and flags["api_keys"] == "--api-key"
    assert "bases" not in flags and "variants" not in flags


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    from deltas import __version__

    assert result.exit_code == 0 and result.output.strip() == f"deltagate {__version__}"
