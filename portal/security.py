"""What every response and every session is held to: security headers, session
lifetimes, and the sign-in attempt limits. `init_security(app)` wires it all in.

- Headers on every response: a Content-Security-Policy that allows only the portal's
  own scripts, styles and images (no inline script or style: the templates have
  none) and no framing, `X-Frame-Options: DENY`, `X-Content-Type-Options: nosniff`,
  `Referrer-Policy: same-origin`, HSTS on HTTPS requests, and `Cache-Control:
  no-store` on whatever is served to a signed-in user.
- Sessions: the cookie carries the user's session version (see `User.get_id`), and
  the time of sign-in and of the last request; a session ends after
  `SESSION_IDLE_MINUTES` without a request or `SESSION_MAX_HOURS` after sign-in.
- Sign-in attempts: `limiter` (Flask-Limiter, in Redis at `REDIS_URL`) counts them
  per email and per client address (`LOGIN_LIMIT_PER_ACCOUNT`,
  `LOGIN_LIMIT_PER_ADDRESS`); past a limit the answer is 429 with `Retry-After`,
  whatever the password. While Redis is unreachable each process counts in memory.
"""
from __future__ import annotations

import hashlib
import time

from flask import Flask, current_app, flash, render_template, request, session
from flask_limiter import Limiter
from flask_limiter.errors import RateLimitExceeded
from flask_limiter.util import get_remote_address
from flask_login import current_user, logout_user, user_logged_in
from werkzeug.middleware.proxy_fix import ProxyFix

CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data:",
    "font-src 'self'",
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "frame-ancestors 'none'",
    # No form-action: "Manage payment methods" posts here and is redirected to
    # Stripe's portal, and browsers apply form-action to that redirect too.
])
HSTS = "max-age=31536000; includeSubDomains"
LOGIN_AT = "_login_at"
SEEN_AT = "_seen_at"
# The last-request time is written back at most this often (each write is a new cookie).
SEEN_AT_RESOLUTION_SECONDS = 60

limiter = Limiter(key_func=get_remote_address, key_prefix="portal", headers_enabled=True,
                  strategy="moving-window", in_memory_fallback_enabled=True, swallow_errors=True)


def _login_email_key() -> str:
    """The account a sign-in attempt is for: its email as the login view reads it,
    hashed (no addresses in Redis)."""
    email = (request.form.get("email") or "").strip().lower()
    return "login-email:" + hashlib.sha256(email.encode()).hexdigest()


def _login_address_key() -> str:
    return "login-address:" + (get_remote_address() or "")


def limit_login_attempts(view):
    """Limit POSTs to `view` per email and per client address (limits from the config)."""
    view = limiter.limit(lambda: current_app.config["LOGIN_LIMIT_PER_ACCOUNT"], key_func=_login_email_key,
                         methods=["POST"], scope="login-account")(view)
    return limiter.limit(lambda: current_app.config["LOGIN_LIMIT_PER_ADDRESS"], key_func=_login_address_key,
                         methods=["POST"], scope="login-address")(view)


def init_security(app: Flask) -> None:
    proxies = app.config.get("TRUSTED_PROXY_COUNT", 0)
    if proxies:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=proxies, x_proto=proxies, x_host=proxies)
    app.config.setdefault("RATELIMIT_STORAGE_URI", app.config["REDIS_URL"])
    limiter.init_app(app)
    app.before_request(_end_expired_session)
    app.after_request(_security_headers)
    app.register_error_handler(RateLimitExceeded, _too_many_attempts)
    user_logged_in.connect(_stamp_sign_in, app)


def _stamp_sign_in(_app, user, **_extra) -> None:
    now = int(time.time())
    session[LOGIN_AT] = now
    session[SEEN_AT] = now


def _end_expired_session() -> None:
    if "_user_id" not in session:
        return
    now = int(time.time())
    login_at, seen_at = session.get(LOGIN_AT), session.get(SEEN_AT)
    config = current_app.config
    if (not isinstance(login_at, int) or not isinstance(seen_at, int)
            or now - login_at > config["SESSION_MAX_HOURS"] * 3600
            or now - seen_at > config["SESSION_IDLE_MINUTES"] * 60):
        logout_user()
        session.clear()
        flash("Your session has ended; please sign in again.", "info")
        return
    if now - seen_at >= SEEN_AT_RESOLUTION_SECONDS:
        session[SEEN_AT] = now


def _security_headers(response):
    headers = response.headers
    headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    headers.setdefault("X-Frame-Options", "DENY")
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("Referrer-Policy", "same-origin")
    if request.is_secure:
        headers.setdefault("Strict-Transport-Security", HSTS)
    if current_user.is_authenticated:
        headers["Cache-Control"] = "no-store"
    return response


def _too_many_attempts(error: RateLimitExceeded):
    if request.blueprint == "auth":
        from portal.auth.forms import LoginForm

        flash("Too many sign-in attempts. Wait a few minutes and try again.", "error")
        return render_template("auth/login.html", form=LoginForm()), 429
    return error
