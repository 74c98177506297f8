"""What the benchmarks share: a rebuilt PostgreSQL database and a portal web server."""
from __future__ import annotations

import os
import re
import socket
import statistics
import subprocess
import time
import urllib.request
from pathlib import Path

import psycopg
import requests

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


def percentiles(samples: list[float]) -> dict:
    """p50 and p95 of `samples` (seconds), in milliseconds."""
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return {"n": len(ordered), "p50_ms": round(statistics.median(ordered) * 1000, 2),
            "p95_ms": round(p95 * 1000, 2)}


def sign_in(base: str, email: str, password: str) -> requests.Session:
    """A session signed in through the login form (its CSRF token included)."""
    session = requests.Session()
    form = session.get(base + "/login").text
    token = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', form)
    data = {"email": email, "password": password}
    if token:
        data["csrf_token"] = token.group(1)
    response = session.post(base + "/login", data=data, allow_redirects=False)
    if response.status_code not in (302, 303):
        raise SystemExit(f"could not sign in as {email}: {response.status_code}")
    return session
