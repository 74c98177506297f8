"""Bearer tokens from `PORTAL_API_TOKENS`, compared in constant time.

An entry is `TOKEN` or `SENDER:TOKEN`; the sender name scopes usage event ids (a
resent event is one from the same sender with the same id), so name senders when
tokens rotate. A bare token's sender is derived from the token itself.
"""
from __future__ import annotations

import hashlib
import hmac

from flask import current_app, g, request

from portal.api.errors import ApiError

# Endpoints served without a token: only the API's own description (portal/api/docs.py).
PUBLIC_ENDPOINTS: set[str] = set()


def public(view):
    """Mark an `api` view as served without a bearer token."""
    PUBLIC_ENDPOINTS.add(f"api.{view.__name__}")
    return view


def _senders() -> list[tuple[str, bytes]]:
    senders = []
    for entry in current_app.config["PORTAL_API_TOKENS"]:
        name, sep, token = entry.partition(":")
        if not sep:
            token, name = entry, "token-" + hashlib.sha256(entry.encode()).hexdigest()[:12]
        senders.append((name, token.encode()))
    return senders


def authenticate() -> None:
    """Set `g.api_sender` from the Authorization header, or raise a 401."""
    if request.endpoint in PUBLIC_ENDPOINTS:
        return
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented:
        raise ApiError(401, "unauthorized", "Authorization: Bearer <token> is required")
    presented_bytes = presented.strip().encode()
    sender = None
    # Compare with every token, always, so timing does not reveal which one matched.
    for name, token in _senders():
        if hmac.compare_digest(presented_bytes, token):
            sender = name
    if sender is None:
        raise ApiError(401, "unauthorized", "the bearer token is not valid")
    g.api_sender = sender
