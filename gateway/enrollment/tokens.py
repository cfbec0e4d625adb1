"""One-time bootstrap tokens: random, url-safe, and stored only as their sha256."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable

TOKEN_BYTES = 24  # 192 bits of randomness; 32 url-safe characters


def new_token(random_bytes: Callable[[int], bytes]) -> str:
    return base64.urlsafe_b64encode(random_bytes(TOKEN_BYTES)).decode("ascii").rstrip("=")


def token_hash(token: str) -> str:
    """What the registry keeps: a copy of the registry does not let anyone enroll."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()
