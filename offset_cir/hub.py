"""The Hugging Face hub as every loader here sees it: switched off by the environment, or answering, or not.

One probe for all that may fetch from the hub (OpenCLIP weights by tag, ``hf-hub:`` checkpoints, the mask
models), so "offline" means the same thing everywhere and a machine without network fails after one short
connection probe (``hub_reachable``) instead of retrying. Switches are read as huggingface_hub reads them (``1``,
``true``, ``yes``, ``on``, any case); the endpoint is ``HF_ENDPOINT`` when set (a mirror), else huggingface.co.
"""
from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

__all__ = ["env_flag", "hub_offline", "hub_address", "hub_reachable"]

DEFAULT_ENDPOINT = "https://huggingface.co"
_TRUE = {"1", "true", "yes", "on"}


def env_flag(name: str) -> bool:
    """Whether the environment variable ``name`` is switched on (1/true/yes/on, any case, spaces ignored)."""
    return os.environ.get(name, "").strip().lower() in _TRUE


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` is switched on: nothing may be fetched from the hub."""
    return env_flag("HF_HUB_OFFLINE")


def hub_address() -> tuple[str, int]:
    """(host, port) of the hub endpoint: ``HF_ENDPOINT`` when set, else huggingface.co (443; 80 for http)."""
    url = urlparse(os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT)
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when :func:`hub_offline`; otherwise one TCP connection attempt to :func:`hub_address` that must
    succeed within ``timeout`` seconds (no retry, no HTTP request)."""
    if hub_offline():
        return False
    try:
        socket.create_connection(hub_address(), timeout=timeout).close()
    except OSError:
        return False
    return True
