"""Helpers for driving the JSON API in tests."""
from __future__ import annotations

from datetime import datetime, timezone

TOKEN = "test-token"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}


def stamp(at: datetime) -> str:
    return at.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def event(event_id: str, organization: str, product: str, quantity="1", occurred_at: str | None = None,
          resource: str | None = None) -> dict:
    body = {"id": event_id, "organization": organization, "product": product, "quantity": quantity,
            "occurred_at": occurred_at or stamp(datetime.now(timezone.utc))}
    if resource is not None:
        body["resource"] = resource
    return body


def post_usage(client, events, headers=HEADERS):
    return client.post("/api/v1/usage", json={"events": events}, headers=headers)
