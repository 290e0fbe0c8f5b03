"""What every example needs: the gateway's URL and, for the admin API, its admin token."""

from __future__ import annotations

import os

from server.settings import default_state_dir

URL = os.environ.get("DELTAGATE_URL", "http://127.0.0.1:8000")


def admin_token() -> str:
    """DELTAGATE_ADMIN_TOKEN, else the token a gateway on this machine wrote into its state dir."""
    token = os.environ.get("DELTAGATE_ADMIN_TOKEN")
    if token:
        return token
    path = default_state_dir() / "admin_token"
    if not path.is_file():
        raise SystemExit(f"no DELTAGATE_ADMIN_TOKEN and no {path}: set the gateway's admin token")
    return path.read_text().strip()
