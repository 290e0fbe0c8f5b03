"""`serve --ray` without Ray: how replicas split cores, and which settings are refused up front."""

from __future__ import annotations

import pytest

from loaders.engine import cores_for
from server.cluster.run import portable
from server.errors import BadRequestError
from server.settings import BaseSpec, GatewaySettings, StartupTerm, StartupVariant


def test_replicas_split_the_cores_by_local_rank():
    assert [cores_for(r, 2, [0, 1]) for r in (0, 1)] == ["0", "1"]
    assert [cores_for(r, 2, [0, 1, 2, 3]) for r in (0, 1)] == ["0,1", "2,3"]
    assert cores_for(2, 3, [0, 1]) == "0"  # more replicas than cores: they share, one core each


def test_settings_are_made_portable_or_refused(tied, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.safetensors").write_bytes(b"")
    variant = StartupVariant(
        name="v", terms=[StartupTerm(ref="d.safetensors"), StartupTerm(ref="registered")]
    )
    settings = GatewaySettings(
        state_dir="state", bases=[BaseSpec(name="b", path=str(tied.base))], variants=[variant]
    )
    out = portable(settings)
    assert out.state_dir == tmp_path / "state"
    assert out.variants[0].terms[0].ref == str(tmp_path / "d.safetensors")  # a path, made absolute
    assert out.variants[0].terms[1].ref == "registered"  # a registered delta's name, kept
    two = settings.model_copy(update={"bases": [*settings.bases, BaseSpec(name="c", path=str(tied.base))]})
    assert [b.name for b in portable(two).bases] == ["b", "c"]  # a deployment each
    attached = settings.model_copy(
        update={"bases": [BaseSpec(name="b", path=str(tied.base), engine_url="http://x")]}
    )
    with pytest.raises(BadRequestError, match="--engine-url"):
        portable(attached)
    missing = settings.model_copy(update={"bases": [BaseSpec(name="b", path=str(tmp_path / "nope"))]})
    with pytest.raises(BadRequestError, match="not a checkpoint dir"):
        portable(missing)
