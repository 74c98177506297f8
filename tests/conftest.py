"""Fixtures: `app`, `db`, `client`, `runner`, `auth`, `redis_url`, `make` (factories),
`count_queries`, `live_server`, `stripe_emulator`.

Tests commit for real (the concurrency and crash tests need it); every test that
uses `app` starts from empty tables and an empty Redis database.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from flask import Flask
from sqlalchemy import text

from config import TestConfig, database_url
from tests.factories import Factories
from tests.query_counter import QueryCounter
from tests.services import RedisServer, redis_url_from_env, require_database, require_redis


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> str:
    url = redis_url_from_env()
    if url:
        require_redis(url)
        yield url
        return
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def database_uri(tmp_path_factory) -> str:
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        url = database_url(url)
        require_database(url)
        return url
    return f"sqlite:///{tmp_path_factory.mktemp('db') / 'test.db'}"


@pytest.fixture(scope="session")
def _session_app(database_uri: str, redis_url: str) -> Flask:
    from flask_migrate import upgrade

    from portal import create_app
    from portal.extensions import db

    class Config(TestConfig):
        SQLALCHEMY_DATABASE_URI = database_uri
        REDIS_URL = redis_url

    app = create_app(Config)
    with app.app_context():
        if db.engine.dialect.name == "postgresql":
            with db.engine.begin() as connection:
                connection.execute(text("DROP SCHEMA public CASCADE"))
                connection.execute(text("CREATE SCHEMA public"))
        upgrade()  # the real migrations, not create_all: tests prove them too
    yield app
    with app.app_context():
        db.engine.dispose()


def sqlite_audit_triggers() -> list[str]:
    """The statements of the migration that make audit entries append-only on SQLite."""
    import importlib.util

    [path] = (Path(__file__).resolve().parent.parent / "migrations" / "versions").glob("*_support_console.py")
    spec = importlib.util.spec_from_file_location("support_console_migration", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SQLITE_TRIGGERS


def _empty_tables() -> None:
    from portal.extensions import db

    tables = [table for table in reversed(db.metadata.sorted_tables)]
    with db.engine.begin() as connection:
        if db.engine.dialect.name == "postgresql":
            # TRUNCATE fires no row triggers: the append-only audit lets it through.
            names = ", ".join(table.name for table in tables)
            connection.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
        else:
            # SQLite has no TRUNCATE: lift the audit's triggers for the emptying only.
            connection.execute(text("DROP TRIGGER IF EXISTS audit_entries_no_update"))
            connection.execute(text("DROP TRIGGER IF EXISTS audit_entries_no_delete"))
            for table in tables:
                connection.execute(table.delete())
            for statement in sqlite_audit_triggers():
                connection.execute(text(statement))


@pytest.fixture
def app(_session_app: Flask) -> Flask:
    from portal.extensions import db
    from portal.queue import redis_connection

    with _session_app.app_context():
        _empty_tables()
        redis_connection().flushdb()
        yield _session_app
        db.session.remove()


@pytest.fixture
def db(app):
    from portal.extensions import db

    return db


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


@pytest.fixture
def count_queries(db) -> QueryCounter:
    """`with count_queries:` counts the SQL statements sent meanwhile (`.count`, `.statements`)."""
    return QueryCounter(db.engine)


@pytest.fixture
def make(db) -> Factories:
    return Factories(db)


class AuthActions:
    def __init__(self, client):
        self.client = client

    def login(self, email: str, password: str = "password123"):
        return self.client.post("/login", data={"email": email, "password": password})

    def logout(self):
        return self.client.post("/logout")


@pytest.fixture
def auth(client) -> AuthActions:
    return AuthActions(client)


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


class LiveServer:
    def __init__(self, url: str, process):
        self.url = url
        self.process = process


@pytest.fixture
def live_server(request, app, database_uri, redis_url, tmp_path):
    """The portal served by gunicorn (several worker processes) on the test database;
    billing against the emulator when the test also uses `stripe_emulator`."""
    import subprocess
    import sys
    import time
    import urllib.request

    from tests.services import free_port

    port = free_port()
    from tests.webhook_helpers import SECRET

    env = {**os.environ, "DATABASE_URL": database_uri, "REDIS_URL": redis_url, "SECRET_KEY": "live-test",
           "PORTAL_API_TOKENS": "test-token", "STRIPE_WEBHOOK_SECRET": SECRET}
    if "stripe_emulator" in request.fixturenames:
        emulator = request.getfixturevalue("stripe_emulator")
        env.update(STRIPE_API_KEY=emulator.api_key, STRIPE_API_BASE=emulator.url)
    root = Path(__file__).resolve().parent.parent
    log = (tmp_path / "gunicorn.log").open("w")
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "gunicorn"), "--bind", f"127.0.0.1:{port}", "--workers", "3",
         "--threads", "2", "wsgi:app"], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1):
                break
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError("gunicorn did not start: " + (tmp_path / "gunicorn.log").read_text()) from None
            time.sleep(0.1)
    yield LiveServer(url, process)
    process.terminate()
    process.wait(timeout=15)
    log.close()


@pytest.fixture(scope="session")
def stripe_emulator_process():
    """The project's Stripe emulator, a real HTTP server in its own process."""
    from stripe_emulator.process import start_emulator

    emulator = start_emulator()
    yield emulator
    emulator.stop()


@pytest.fixture
def stripe_emulator(app, stripe_emulator_process):
    """A reset emulator, with the app configured to bill against it."""
    stripe_emulator_process.control.reset()
    saved = {key: app.config.get(key) for key in ("STRIPE_API_KEY", "STRIPE_API_BASE")}
    app.config.update(STRIPE_API_KEY=stripe_emulator_process.api_key, STRIPE_API_BASE=stripe_emulator_process.url)
    yield stripe_emulator_process
    app.config.update(saved)
    stripe_emulator_process.control.clear_faults()
