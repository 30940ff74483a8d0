"""Reaching the Hugging Face hub: fail fast and clearly when there is no network."""

from __future__ import annotations

import os
import socket

from llmgen.errors import LlmgenError

HUB_HOST = "huggingface.co"


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the hub's host name resolves and accepts a connection."""
    endpoint = os.environ.get("HF_ENDPOINT", f"https://{HUB_HOST}")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0].split(":")[0]
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def require_hub(what: str) -> None:
    """Raise a one-line error for `what` (e.g. "data.source hf:x") when the hub cannot be reached.

    With HF_HUB_OFFLINE=1 the check is skipped: the libraries then read their local cache.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return
    if not hub_reachable():
        raise LlmgenError(f"{what}: needs the Hugging Face hub, but {HUB_HOST} cannot be reached (no network?); "
                          f"use a local copy instead, or set HF_HUB_OFFLINE=1 to read a cached copy")
