"""Configuration read from the environment (and an optional `.env`).

Nothing here has a default that would be safe in production: `SECRET_KEY` must be
set outside development, `DATABASE_URL` falls back to a local SQLite file (the
embedded default), and Stripe is off until `STRIPE_API_KEY` is set.
"""
from __future__ import annotations

import os
from pathlib import Path

from dotenv import load_dotenv

BASE_DIR = Path(__file__).resolve().parent
load_dotenv(BASE_DIR / ".env")


def _int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def _list(name: str) -> list[str]:
    return [part.strip() for part in os.environ.get(name, "").split(",") if part.strip()]


def database_url(url: str | None) -> str:
    """Normalise a database URL: PostgreSQL goes through psycopg 3."""
    url = url or f"sqlite:///{BASE_DIR / 'instance' / 'portal.db'}"
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://"):]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    return url


class Config:
    SECRET_KEY = os.environ.get("SECRET_KEY")
    SQLALCHEMY_DATABASE_URI = database_url(os.environ.get("DATABASE_URL"))
    SQLALCHEMY_ENGINE_OPTIONS = {"pool_pre_ping": True}
    REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    STRIPE_API_KEY = os.environ.get("STRIPE_API_KEY")
    STRIPE_API_BASE = os.environ.get("STRIPE_API_BASE")
    STRIPE_WEBHOOK_SECRETS = _list("STRIPE_WEBHOOK_SECRET")
    PORTAL_API_TOKENS = _list("PORTAL_API_TOKENS")
    SYNC_INTERVAL_SECONDS = _int("SYNC_INTERVAL_SECONDS", 60)
    CLOSE_INTERVAL_SECONDS = _int("CLOSE_INTERVAL_SECONDS", 300)
    # Stripe counts reads and writes together: about 25 a second in test mode, 100 in
    # live mode. STRIPE_MAX_WRITES_PER_SECOND is the older name of the same budget.
    STRIPE_MAX_REQUESTS_PER_SECOND = _int("STRIPE_MAX_REQUESTS_PER_SECOND",
                                          _int("STRIPE_MAX_WRITES_PER_SECOND", 20))
    # The customer-portal configuration to open sessions with (`bpc_...`); unset: the
    # account's default configuration (saved once in Stripe's Dashboard).
    STRIPE_PORTAL_CONFIGURATION = os.environ.get("STRIPE_PORTAL_CONFIGURATION") or None
    # Test keys only (refused with a live key): a Stripe test payment method such as
    # `pm_card_visa` given to each new Stripe customer, so the demo's invoices get paid.
    STRIPE_TEST_PAYMENT_METHOD = os.environ.get("STRIPE_TEST_PAYMENT_METHOD") or None
    # A full usage batch (5,000 events) is about 1 MB of JSON.
    MAX_CONTENT_LENGTH = 8 * 1024 * 1024
    SESSION_COOKIE_HTTPONLY = True
    SESSION_COOKIE_SAMESITE = "Lax"
    WTF_CSRF_TIME_LIMIT = None


class TestConfig(Config):
    TESTING = True
    SECRET_KEY = "test-secret-key"
    SQLALCHEMY_DATABASE_URI = database_url(os.environ.get("TEST_DATABASE_URL") or "sqlite://")
    REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    PORTAL_API_TOKENS = ["test-token"]
    WTF_CSRF_ENABLED = False
    # Tests that are about the request budget set their own.
    STRIPE_MAX_REQUESTS_PER_SECOND = 1000
    STRIPE_TEST_PAYMENT_METHOD = None
