"""Signing in and staying signed in, safely: attempt limits, refusals that take the
same time, sessions that end, the cookie's flags, password hashing, who may do what,
and the security headers on every response."""
from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from flask import g
from werkzeug.security import generate_password_hash

from portal.models import Membership, User

ROOT = Path(__file__).resolve().parent.parent


def _login(client, email: str, password: str = "password123", **kwargs):
    return client.post("/login", data={"email": email, "password": password}, **kwargs)


def _signed_in(client) -> bool:
    """Whether the client's cookie still signs someone in. (The test's app context is
    shared by the client's requests, so Flask-Login's per-request cache of the user
    in `g` is dropped first, as a new request in a server would start without it.)"""
    g.pop("_login_user", None)
    response = client.get("/billing")
    return not (response.status_code == 302 and "/login" in response.headers["Location"])


# --- 1. sign-in attempts are limited, per account and per client address ------------


def test_attempts_on_one_account_are_limited_and_then_even_the_right_password_is_refused(
        app, client, make, monkeypatch):
    monkeypatch.setitem(app.config, "LOGIN_LIMIT_PER_ACCOUNT", "3 per 15 minutes")
    make.user("ann@example.com", organization=make.organization())
    make.user("bob@example.com", organization=make.organization())
    for _ in range(3):
        assert _login(client, "ann@example.com", "wrong-guess").status_code == 401
    response = _login(client, " Ann@Example.com ", "password123")  # the same account, however it is typed
    assert response.status_code == 429
    assert int(response.headers["Retry-After"]) > 0
    assert "Too many sign-in attempts" in response.get_data(as_text=True)
    assert not _signed_in(client)
    # Another account from the same address is not held back by ann's limit.
    assert _login(client, "bob@example.com").status_code == 302
    assert _signed_in(client)
    # The count lives in the app's Redis (shared by every web process).
    assert redis.Redis.from_url(app.config["REDIS_URL"]).keys("*login-account*")


def test_attempts_from_one_address_are_limited_across_accounts(app, client, make, monkeypatch):
    monkeypatch.setitem(app.config, "LOGIN_LIMIT_PER_ADDRESS", "4 per 15 minutes")
    make.user("ann@example.com", organization=make.organization())
    here = {"REMOTE_ADDR": "203.0.113.7"}
    for n in range(4):
        assert _login(client, f"guess{n}@example.com", environ_base=here).status_code == 401
    response = _login(client, "ann@example.com", environ_base=here)
    assert response.status_code == 429 and int(response.headers["Retry-After"]) > 0
    assert not _signed_in(client)
    # The same account from another address gets in.
    assert _login(client, "ann@example.com", environ_base={"REMOTE_ADDR": "198.51.100.9"}).status_code == 302


def test_the_default_limits_are_10_per_account_and_30_per_address_in_15_minutes(app):
    from config import Config

    assert Config.LOGIN_LIMIT_PER_ACCOUNT == "10 per 15 minutes"
    assert Config.LOGIN_LIMIT_PER_ADDRESS == "30 per 15 minutes"
    assert app.config["RATELIMIT_STORAGE_URI"] == app.config["REDIS_URL"]


# --- 2. an unknown email is refused as slowly as a wrong password -------------------


def test_refusing_an_unknown_email_takes_as_long_as_refusing_a_wrong_password(app, client, make, monkeypatch):
    # A measurable cost for this test (OWASP's minimum argon2id: t=2, 19 MiB).
    monkeypatch.setitem(app.config, "ARGON2_TIME_COST", 2)
    monkeypatch.setitem(app.config, "ARGON2_MEMORY_COST", 19 * 1024)
    make.user("ann@example.com")

    def median_refusal(email: str) -> float:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            assert _login(client, email, "not-the-password").status_code == 401
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    median_refusal("nobody@example.com")  # warm up (the dummy hash is made once)
    wrong_password, unknown_email = median_refusal("ann@example.com"), median_refusal("nobody@example.com")
    assert 0.6 < unknown_email / wrong_password < 1.6, (unknown_email, wrong_password)


# --- 3. sessions end: sign-out, new password, idle and absolute lifetimes -----------


def _session_cookie(client) -> str:
    return client.get_cookie("session").value


def test_a_cookie_copied_before_sign_out_no_longer_signs_in(app, client, make):
    make.user("ann@example.com", organization=make.organization())
    assert _login(client, "ann@example.com").status_code == 302
    copied = _session_cookie(client)
    client.post("/logout")
    replay = app.test_client()
    replay.set_cookie("session", copied)
    assert not _signed_in(replay)


def test_a_new_password_ends_the_sessions_signed_in_with_the_old_one(app, client, db, make):
    user = make.user("ann@example.com", organization=make.organization())
    assert _login(client, "ann@example.com").status_code == 302
    assert _signed_in(client)
    user.set_password("a-brand-new-password")
    db.session.commit()
    assert not _signed_in(client)
    assert _login(client, "ann@example.com", "a-brand-new-password").status_code == 302
    assert _signed_in(client)


def test_a_session_ends_after_the_idle_time(app, client, make, monkeypatch):
    monkeypatch.setitem(app.config, "SESSION_IDLE_MINUTES", 20)
    make.user("ann@example.com", organization=make.organization())
    _login(client, "ann@example.com")
    with client.session_transaction() as session:
        session["_seen_at"] -= 19 * 60  # active 19 minutes ago: still signed in, and the clock restarts
    assert _signed_in(client)
    with client.session_transaction() as session:
        assert time.time() - session["_seen_at"] < 60
        session["_seen_at"] -= 21 * 60
    assert not _signed_in(client)


def test_a_session_ends_after_the_absolute_time_however_active(app, client, make, monkeypatch):
    monkeypatch.setitem(app.config, "SESSION_MAX_HOURS", 8)
    make.user("ann@example.com", organization=make.organization())
    _login(client, "ann@example.com")
    with client.session_transaction() as session:
        session["_login_at"] -= 7 * 3600
    assert _signed_in(client)
    with client.session_transaction() as session:
        session["_login_at"] -= 2 * 3600
    assert not _signed_in(client)
    assert "Your session has ended" in client.get("/login").get_data(as_text=True)


def test_session_lifetimes_are_configured_from_the_environment():
    output = _config_in_subprocess("SESSION_IDLE_MINUTES", "SESSION_MAX_HOURS",
                                   env={"SESSION_IDLE_MINUTES": "5", "SESSION_MAX_HOURS": "2"})
    assert output == ["5", "2"]


# --- 4. the session cookie is Secure outside local development ----------------------


def _config_in_subprocess(*names: str, env: dict[str, str]) -> list[str]:
    clean = {key: value for key, value in os.environ.items() if key not in ("SESSION_COOKIE_SECURE",)}
    code = "import config; " + "; ".join(f"print(config.Config.{name})" for name in names)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**clean, **env},
                            capture_output=True, text=True, check=True)
    return result.stdout.split()


def test_the_session_cookie_is_secure_unless_turned_off_for_local_http():
    assert _config_in_subprocess("SESSION_COOKIE_SECURE", env={}) == ["True"]
    assert _config_in_subprocess("SESSION_COOKIE_SECURE", env={"SESSION_COOKIE_SECURE": "0"}) == ["False"]
    # The run command serves its demo over http on this machine: it turns it off there.
    assert 'env.setdefault("SESSION_COOKIE_SECURE", "0")' in (ROOT / "run.py").read_text()


def test_a_secure_app_sends_the_session_cookie_with_secure_and_httponly(app, client, make, monkeypatch):
    monkeypatch.setitem(app.config, "SESSION_COOKIE_SECURE", True)
    make.user("ann@example.com", organization=make.organization())
    response = _login(client, "ann@example.com", base_url="https://localhost")
    cookie = response.headers["Set-Cookie"]
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie


# --- 5. argon2id, and older hashes upgraded at sign-in ------------------------------


def test_new_passwords_are_hashed_with_argon2id_and_production_cost_meets_owasp(app, make, monkeypatch):
    from config import Config
    from portal import passwords

    assert make.user("ann@example.com").password_hash.startswith("$argon2id$")
    # OWASP's argon2id minimum is t=2 with 19 MiB (or t=1 with 46 MiB); production is above it.
    assert Config.ARGON2_TIME_COST >= 2 and Config.ARGON2_MEMORY_COST >= 19 * 1024
    for name in ("ARGON2_TIME_COST", "ARGON2_MEMORY_COST", "ARGON2_PARALLELISM"):
        monkeypatch.setitem(app.config, name, getattr(Config, name))
    assert passwords.hash_password("x").startswith("$argon2id$v=19$m=65536,t=3,p=4$")


@pytest.mark.parametrize("legacy", ["scrypt", "pbkdf2:sha256", "argon2id-weaker"])
def test_an_older_hash_is_replaced_at_the_next_sign_in(app, client, db, make, monkeypatch, legacy):
    user = make.user("ann@example.com", organization=make.organization())
    if legacy == "argon2id-weaker":
        from portal import passwords

        monkeypatch.setitem(app.config, "ARGON2_MEMORY_COST", 16)
        old_hash = passwords.hash_password("password123")
    else:
        old_hash = generate_password_hash("password123", method=legacy)
    monkeypatch.setitem(app.config, "ARGON2_MEMORY_COST", 32)  # today's cost
    user.password_hash = old_hash
    db.session.commit()
    assert _login(client, "ann@example.com", "wrong-password").status_code == 401
    assert db.session.get(User, user.id).password_hash == old_hash  # not on a failed attempt
    assert _login(client, "ann@example.com").status_code == 302
    db.session.expire_all()
    new_hash = db.session.get(User, user.id).password_hash
    assert new_hash != old_hash and new_hash.startswith("$argon2id$v=19$m=32,")
    assert _signed_in(client)  # replacing the hash is not a new password: the session carries on
    client.post("/logout")
    assert _login(client, "ann@example.com").status_code == 302


# --- 6. roles: members read, owners manage payment methods --------------------------


@pytest.fixture
def acme(make):
    organization = make.organization(slug="acme", name="Acme")
    make.open_invoice(organization)
    make.user("owner@example.com", organization=organization, role="owner")
    make.user("member@example.com", organization=organization, role="member")
    return organization


def test_a_member_reads_the_billing_page_but_cannot_manage_payment_methods(client, acme):
    _login(client, "member@example.com")
    page = client.get("/orgs/acme/billing")
    assert page.status_code == 200
    text = page.get_data(as_text=True)
    assert "Current invoice" in text and "Only an owner of Acme can change it" in text
    assert "Manage payment methods" not in text and "/billing/payment-methods" not in text
    assert client.post("/orgs/acme/billing/payment-methods").status_code == 403


def test_an_owner_sees_and_may_use_the_payment_methods_button(client, acme):
    _login(client, "owner@example.com")
    text = client.get("/orgs/acme/billing").get_data(as_text=True)
    assert "Manage payment methods" in text
    response = client.post("/orgs/acme/billing/payment-methods", follow_redirects=True)
    assert response.status_code == 200  # no Stripe customer yet: told so, not refused
    assert response.request.path == "/orgs/acme/billing"


def test_a_member_who_owns_another_organization_is_only_a_member_here(client, db, make, acme):
    other = make.organization(slug="mine")
    member = db.session.query(User).filter_by(email="member@example.com").one()
    db.session.add(Membership(user_id=member.id, organization_id=other.id, role="owner"))
    db.session.commit()
    _login(client, "member@example.com")
    assert client.post("/orgs/acme/billing/payment-methods").status_code == 403
    assert client.post("/orgs/mine/billing/payment-methods").status_code == 302


# --- 7. security headers on every response ------------------------------------------


def _assert_security_headers(response) -> None:
    csp = response.headers["Content-Security-Policy"]
    directives = dict(part.strip().split(" ", 1) for part in csp.split(";"))
    assert directives["default-src"] == "'self'"
    assert directives["script-src"] == "'self'" and directives["style-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'" and directives["object-src"] == "'none'"
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] in ("same-origin", "strict-origin", "no-referrer")


def test_every_response_carries_the_security_headers(client, make):
    responses = [client.get("/login"), client.get("/billing"), client.get("/healthz"),
                 client.get("/static/portal.css"), client.get("/no-such-page"),
                 client.get("/api/v1/products", headers={"Authorization": "Bearer test-token"})]
    assert [response.status_code for response in responses] == [200, 302, 200, 200, 404, 200]
    for response in responses:
        _assert_security_headers(response)
        assert "Strict-Transport-Security" not in response.headers  # plain http: HSTS means nothing


def test_hsts_on_https_requests(client):
    response = client.get("/login", base_url="https://portal.example")
    assert response.headers["Strict-Transport-Security"].startswith("max-age=31536000")
    _assert_security_headers(response)


def test_pages_for_a_signed_in_user_are_not_stored(client, make):
    make.user("ann@example.com", organization=make.organization(slug="initech"))
    sign_in = _login(client, "ann@example.com")
    assert sign_in.headers["Cache-Control"] == "no-store"
    for path in ("/billing", "/orgs/initech/billing"):
        response = client.get(path)
        assert response.headers["Cache-Control"] == "no-store", path
        _assert_security_headers(response)


def test_templates_have_no_inline_script_style_or_event_handlers():
    found = []
    for template in sorted((ROOT / "templates").rglob("*.html")):
        text = template.read_text()
        for pattern in (r"<script(?![^>]*\bsrc=)[^>]*>", r"<style\b", r"\sstyle\s*=", r"\son[a-z]+\s*=",
                        r"javascript:"):
            found += [f"{template.relative_to(ROOT)}: {m.group(0)}" for m in re.finditer(pattern, text, re.I)]
    assert found == []
