"""Configuration read from the environment (and an optional `.env`).

Nothing here has a default that would be safe in production: `SECRET_KEY` must be
set outside development, `DATABASE_URL` falls back to a local SQLite file (the
embedded default), and Stripe is off until `STRIPE_API_KEY` is set.
"""
from __future__ import annotations

import os
from decimal import Decimal, InvalidOperation
from pathlib import Path

from dotenv import load_dotenv

BASE_DIR = Path(__file__).resolve().parent
load_dotenv(BASE_DIR / ".env")


def _int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def _bool(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return default


def _decimal(name: str, default: str) -> Decimal:
    value = os.environ.get(name) or default
    try:
        number = Decimal(value)
    except InvalidOperation:
        raise ValueError(f"{name} must be a decimal number, not {value!r}") from None
    if not number.is_finite() or number <= 0:
        raise ValueError(f"{name} must be a positive decimal number, not {value!r}")
    return number


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
    # Each Stripe write attempt is recorded (`stripe_writes`) for support and for the
    # hold-off of unanswered writes (seconds); records older than this are deleted.
    STRIPE_WRITES_KEEP_DAYS = _int("STRIPE_WRITES_KEEP_DAYS", 90)
    # The drift sweep compares this many open invoices with Stripe per run (reads only,
    # about two each), going round all of them in turn.
    DRIFT_SWEEP_INTERVAL_SECONDS = _int("DRIFT_SWEEP_INTERVAL_SECONDS", 300)
    DRIFT_SWEEP_BATCH = _int("DRIFT_SWEEP_BATCH", 20)
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
    # A full usage batch (5,000 events) is about 1 MB of JSON. Bodies over this are
    # refused with 413, chunked or not.
    MAX_CONTENT_LENGTH = 8 * 1024 * 1024
    # Usage older than this many days (or from before its organization existed) is
    # refused: billed periods are not reopened by a late or replayed event.
    USAGE_LOOKBACK_DAYS = _int("USAGE_LOOKBACK_DAYS", 35)
    # The largest quantity one usage event may carry (a decimal); larger is refused.
    USAGE_MAX_QUANTITY = _decimal("USAGE_MAX_QUANTITY", "1000000000")
    SESSION_COOKIE_HTTPONLY = True
    SESSION_COOKIE_SAMESITE = "Lax"
    # The session cookie travels over HTTPS only; the run command's local http demo
    # (and the tests) turn it off with SESSION_COOKIE_SECURE=0.
    SESSION_COOKIE_SECURE = _bool("SESSION_COOKIE_SECURE", True)
    # A session ends after this long without a request, and this long after sign-in.
    SESSION_IDLE_MINUTES = _int("SESSION_IDLE_MINUTES", 30)
    SESSION_MAX_HOURS = _int("SESSION_MAX_HOURS", 12)
    WTF_CSRF_TIME_LIMIT = None
    # Sign-in attempts (Flask-Limiter, counted in Redis at REDIS_URL): per email and
    # per client address; past them the answer is 429 with Retry-After.
    LOGIN_LIMIT_PER_ACCOUNT = os.environ.get("LOGIN_LIMIT_PER_ACCOUNT", "10 per 15 minutes")
    LOGIN_LIMIT_PER_ADDRESS = os.environ.get("LOGIN_LIMIT_PER_ADDRESS", "30 per 15 minutes")
    # Proxies in front of the portal that set X-Forwarded-For/-Proto (0: none): the
    # client address the limits count, and whether the request was HTTPS (HSTS).
    TRUSTED_PROXY_COUNT = _int("TRUSTED_PROXY_COUNT", 0)
    # argon2id password hashing (OWASP ASVS: at least t=2, 19 MiB); these are
    # argon2-cffi's RFC 9106 defaults. Older or weaker hashes are replaced at sign-in.
    ARGON2_TIME_COST = _int("ARGON2_TIME_COST", 3)
    ARGON2_MEMORY_COST = _int("ARGON2_MEMORY_COST", 64 * 1024)  # KiB
    ARGON2_PARALLELISM = _int("ARGON2_PARALLELISM", 4)
    # `GET /metrics` (Prometheus text format) answers a request that carries
    # `Authorization: Bearer <METRICS_TOKEN>` (when set), or one that comes straight
    # (no X-Forwarded-For/Forwarded unless TRUSTED_PROXY_COUNT is set) from an
    # address in METRICS_ALLOW_NETWORKS (comma-separated CIDRs; default loopback;
    # "none": no network, the token only). A signed-in customer is refused (403).
    METRICS_TOKEN = os.environ.get("METRICS_TOKEN") or None
    METRICS_ALLOW_NETWORKS = _list("METRICS_ALLOW_NETWORKS") or ["127.0.0.0/8", "::1/128"]
    # Several processes (gunicorn workers, RQ workers) count into files in this
    # directory, which /metrics adds up (prometheus_client's multi-process mode; the
    # library reads the variable itself when it is imported). It must be empty when
    # they start: the run command clears its *.db files first. Unset: each process
    # counts in memory, and /metrics shows only the answering process's counters
    # (the gauges, read from the database and Redis at each scrape, are right either way).
    PROMETHEUS_MULTIPROC_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
    # Mail (spend alerts). Without SMTP_HOST nothing is sent: mails wait in the outbox
    # (the `mail_outbox` table) and go out once it is set. SMTP_PORT defaults to 25;
    # SMTP_STARTTLS=1 upgrades the connection; SMTP_USERNAME/SMTP_PASSWORD log in.
    SMTP_HOST = os.environ.get("SMTP_HOST") or None
    SMTP_PORT = _int("SMTP_PORT", 25)
    SMTP_FROM = os.environ.get("SMTP_FROM") or "billing@localhost"
    SMTP_STARTTLS = _bool("SMTP_STARTTLS", False)
    SMTP_USERNAME = os.environ.get("SMTP_USERNAME") or None
    SMTP_PASSWORD = os.environ.get("SMTP_PASSWORD") or None


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
    SESSION_COOKIE_SECURE = False  # the test client speaks http
    # Fast hashes in tests only; tests about the cost set their own.
    ARGON2_TIME_COST = 1
    ARGON2_MEMORY_COST = 8
    ARGON2_PARALLELISM = 1
    SMTP_HOST = None  # tests that send mail start their own SMTP server
