"""The app the jobs run in: created on first use in each worker process (never at
import time), and reused by every job that process runs."""
from __future__ import annotations

from flask import Flask

_app: Flask | None = None


def get_app() -> Flask:
    global _app
    if _app is None:
        from portal import create_app

        _app = create_app()
    return _app


def use_app(app: Flask) -> None:
    """Run jobs in this app (tests and in-process workers)."""
    global _app
    _app = app
