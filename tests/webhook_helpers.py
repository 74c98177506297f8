"""Signing deliveries the way Stripe does, for tests that post to the webhook route."""
from __future__ import annotations

import hashlib
import hmac
import json
import time

SECRET = "whsec_test_portal"


def sign(body: bytes, secret: str = SECRET, timestamp: int | None = None) -> str:
    timestamp = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def event_body(event_id: str = "evt_test_1", event_type: str = "invoice.paid", obj: dict | None = None) -> bytes:
    return json.dumps({"id": event_id, "object": "event", "type": event_type, "created": int(time.time()),
                       "data": {"object": obj or {"object": "invoice", "id": "in_unknown"}}}).encode()


def post_event(client, body: bytes, signature: str | None = None, **headers):
    headers = {"Content-Type": "application/json", **headers}
    if signature is not None:
        headers["Stripe-Signature"] = signature
    return client.post("/webhooks/stripe", data=body, headers=headers)
