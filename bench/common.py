"""What the benchmarks share: a rebuilt PostgreSQL database and a portal web server."""
from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rebuild_database(url: str) -> None:
    """Create the database if missing, drop its schema, and migrate it to head."""
    admin_url, _, name = url.rpartition("/")
    with psycopg.connect(f"{admin_url}/postgres", autocommit=True) as admin:
        if not admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            admin.execute(f'CREATE DATABASE "{name}"')
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("DROP SCHEMA public CASCADE")
        connection.execute("CREATE SCHEMA public")
    subprocess.run([str(ROOT / ".venv/bin/flask"), "--app", "wsgi", "db", "upgrade"], cwd=ROOT, check=True,
                   env={**os.environ, "DATABASE_URL": url, "SECRET_KEY": "bench"}, capture_output=True)


def start_web(env: dict, workers: int, threads: int = 1, port: int | None = None,
              output=None) -> tuple[subprocess.Popen, str]:
    """gunicorn serving the portal with `env`; returns the process and its base URL
    once /healthz answers. `port` (default: a free one) and `output` (a file for its
    stdout and stderr; default: inherited) are optional."""
    port = port or free_port()
    process = subprocess.Popen(
        [str(ROOT / ".venv/bin/gunicorn"), "--bind", f"127.0.0.1:{port}", "--workers", str(workers),
         "--threads", str(threads), "--log-level", "warning", "wsgi:app"],
        cwd=ROOT, env={**os.environ, "SECRET_KEY": "bench", **env}, stdout=output,
        stderr=subprocess.STDOUT if output is not None else None)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(base + "/healthz", timeout=1)
            return process, base
        except OSError:
            if process.poll() is not None:
                break
            time.sleep(0.1)
    process.kill()
    raise SystemExit("the web server did not start")
