"""The one error envelope: every error the artifact library raises on purpose (the DeltaError family)
has its HTTP status, never a 500, whichever route it escapes from."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from deltas import DeltaError, IncompatibleError, InvalidArtifactError
from deltas.errors import CodecError, MergeMethodError
from deltas.store import ArtifactMissingError, StoreError
from server.errors import install_error_handlers


@pytest.mark.parametrize(
    ("error", "status", "kind"),
    [
        (ArtifactMissingError, 404, "not_found"),
        (StoreError, 502, "artifact_store_error"),
        (InvalidArtifactError, 422, "invalid_artifact"),
        (IncompatibleError, 422, "incompatible_delta"),
        (CodecError, 422, "invalid_codec"),
        (MergeMethodError, 422, "invalid_merge_method"),
        (DeltaError, 422, "invalid_delta"),
    ],
)
def test_each_delta_error_has_its_status_in_the_envelope_with_the_state_dir_hidden(error, status, kind):
    app = FastAPI()
    install_error_handlers(app, hide="/srv/state")

    @app.get("/boom")
    async def boom():
        raise error("bad thing in /srv/state/deltas/x.safetensors")

    answer = TestClient(app, raise_server_exceptions=False).get("/boom")
    assert answer.status_code == status
    assert answer.json() == {
        "error": {"message": "bad thing in $STATE_DIR/deltas/x.safetensors", "type": kind, "code": status}
    }
