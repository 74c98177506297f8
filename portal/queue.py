"""The Redis connection and RQ queues, built per app (no import-time globals)."""
from __future__ import annotations

from flask import Flask, current_app
from redis import Redis
from rq import Queue

# In the order every worker serves them: the periodic sweeps first, so a backlog of
# syncs or events never holds them up (they only enqueue and return).
QUEUE_NAMES = ("sweeps", "sync", "webhooks", "default")


def init_redis(app: Flask) -> None:
    app.extensions["redis"] = Redis.from_url(
        app.config["REDIS_URL"], socket_connect_timeout=2, socket_timeout=5
    )


def redis_connection() -> Redis:
    return current_app.extensions["redis"]


def queue(name: str = "default") -> Queue:
    if name not in QUEUE_NAMES:
        raise ValueError(f"unknown queue {name!r}")
    return Queue(name, connection=redis_connection())
