"""`flask --app wsgi stripe-check`: is the configured Stripe account ready for the portal?

It reads, never writes: the key (accepted? test or live mode?), the account's default
API version against the one the `stripe` library pins, the webhook endpoints (one
enabled for every event type the portal handles?), the webhook secret's form, and
account features the portal does not model (Stripe Tax, coupons) that would make
Stripe's totals differ from the portal's. Each finding is `ok`, `warn` or `FAIL`; any
FAIL makes the command exit 1.
"""
from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass, field

import stripe

from portal.billing.events import handled_event_types
from portal.stripe_gateway import StripeFailure, StripeGateway, StripeObjectMissing

STRIPE_API = "https://api.stripe.com"
WEBHOOK_PATH = "/webhooks/stripe"


@dataclass
class Report:
    findings: list[tuple[str, str, str]] = field(default_factory=list)  # (level, subject, text)

    def add(self, level: str, subject: str, text: str) -> None:
        self.findings.append((level, subject, text))

    @property
    def failed(self) -> bool:
        return any(level == "FAIL" for level, _, _ in self.findings)

    def lines(self) -> list[str]:
        out = [f"{level:<5} {subject}: {text}" for level, subject, text in self.findings]
        fails = sum(level == "FAIL" for level, _, _ in self.findings)
        warns = sum(level == "warn" for level, _, _ in self.findings)
        out.append(f"{fails} problem(s), {warns} warning(s)" if fails or warns else "Ready.")
        return out


def key_mode(api_key: str) -> str | None:
    """"test" or "live" from the key's prefix (secret `sk_` or restricted `rk_`)."""
    for prefix in ("sk_", "rk_"):
        if api_key.startswith(prefix + "test_"):
            return "test"
        if api_key.startswith(prefix + "live_"):
            return "live"
    return None


def account_default_version(api_key: str, api_base: str | None) -> str | None:
    """The account's default API version: what Stripe answers a request that names
    none (the `stripe` library always names its own, so this one is sent plainly)."""
    request = urllib.request.Request((api_base or STRIPE_API).rstrip("/") + "/v1/account",
                                     headers={"Authorization": f"Bearer {api_key}"})
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.headers.get("Stripe-Version")
    except (urllib.error.URLError, OSError):
        return None


def check(config: dict, forwarded: bool = False, portal_url: str | None = None) -> Report:
    """Run every check against the account of `config`'s STRIPE_API_KEY."""
    report = Report()
    api_key, api_base = config.get("STRIPE_API_KEY"), config.get("STRIPE_API_BASE")
    if not api_key:
        report.add("FAIL", "key", "STRIPE_API_KEY is not set")
        return report
    where = api_base or STRIPE_API
    mode = key_mode(api_key)
    if mode is None:
        report.add("FAIL", "key", f"{api_key[:8]}… is not a Stripe secret or restricted key (sk_/rk_)")
        return report
    if mode == "live" and config.get("STRIPE_TEST_PAYMENT_METHOD"):
        report.add("FAIL", "mode", "STRIPE_TEST_PAYMENT_METHOD is set with a live key: unset it")
    stripe_gateway = StripeGateway(api_key, api_base, budget=None, max_attempts=2)
    try:
        account = stripe_gateway.retrieve_account()
    except StripeFailure as refused:
        report.add("FAIL", "key", f"{where} refused the key ({mode} mode): {refused}")
        return report
    name = getattr(getattr(account, "business_profile", None), "name", None) or getattr(account, "email", None) \
        or account.id
    report.add("ok", "key", f"accepted by {where}: account {account.id} ({name}), {mode} mode"
                            + (": real charges" if mode == "live" else ""))
    _check_versions(report, api_key, api_base)
    _check_webhooks(report, stripe_gateway, config, forwarded, portal_url)
    _check_unmodelled_features(report, stripe_gateway)
    return report


def _check_versions(report: Report, api_key: str, api_base: str | None) -> None:
    library = stripe.api_version
    default = account_default_version(api_key, api_base)
    if default is None:
        report.add("warn", "API version", f"Stripe did not say the account's default; the portal's requests use "
                                          f"{library} (pinned by the stripe library {stripe.VERSION})")
    elif default == library:
        report.add("ok", "API version", f"the account's default is {default}, the stripe library's too")
    else:
        report.add("warn", "API version",
                   f"the account's default is {default}, the stripe library pins {library}: the portal's "
                   f"requests are unaffected, but events for an endpoint without its own API version are "
                   f"shaped as {default}; give the endpoint api_version {library}")


def _check_webhooks(report: Report, stripe_gateway: StripeGateway, config: dict, forwarded: bool,
                    portal_url: str | None) -> None:
    secrets = config.get("STRIPE_WEBHOOK_SECRETS") or []
    if not secrets:
        report.add("FAIL", "webhook secret", "STRIPE_WEBHOOK_SECRET is not set: every delivery would be refused")
    elif any(not secret.startswith("whsec_") for secret in secrets):
        report.add("FAIL", "webhook secret", "STRIPE_WEBHOOK_SECRET holds a value that is not a whsec_… secret")
    else:
        report.add("ok", "webhook secret", f"{len(secrets)} whsec_ secret(s) set (Stripe never shows a secret "
                                           "again: a delivery proves it, listed for support under Stripe events)")
    needed = handled_event_types()
    try:
        endpoints = [endpoint for endpoint in stripe_gateway.webhook_endpoints()
                     if getattr(endpoint, "status", None) == "enabled"]
    except StripeFailure as failure:
        report.add("warn", "webhook endpoint", f"could not list the endpoints: {failure}")
        return
    wanted_url = portal_url.rstrip("/") + WEBHOOK_PATH if portal_url else None
    candidates = [endpoint for endpoint in endpoints
                  if (endpoint.url == wanted_url if wanted_url else endpoint.url.endswith(WEBHOOK_PATH))]
    if not candidates:
        if forwarded:
            report.add("ok", "webhook endpoint", "none registered; events come through `stripe listen`")
            return
        report.add("FAIL", "webhook endpoint",
                   f"no enabled endpoint {'at ' + wanted_url if wanted_url else 'ending in ' + WEBHOOK_PATH}; "
                   f"create one for these events: {', '.join(needed)} (or pass --forwarded with `stripe listen`)")
        return
    best = max(candidates, key=lambda endpoint: _covered(endpoint, needed))
    missing = [event for event in needed if event not in _enabled(best)]
    if missing:
        report.add("FAIL", "webhook endpoint", f"{best.url} ({best.id}) does not send {', '.join(missing)}")
    else:
        report.add("ok", "webhook endpoint", f"{best.url} ({best.id}) sends the {len(needed)} event types "
                                             "the portal handles")
    version = getattr(best, "api_version", None)
    if version and version != stripe.api_version:
        report.add("warn", "webhook endpoint", f"{best.id} sends events as API version {version}; the stripe "
                                               f"library pins {stripe.api_version}")


def _enabled(endpoint) -> set[str]:
    events = set(getattr(endpoint, "enabled_events", None) or [])
    if "*" in events:
        return set(handled_event_types())
    return events


def _covered(endpoint, needed: list[str]) -> int:
    return len(set(needed) & _enabled(endpoint))


def _check_unmodelled_features(report: Report, stripe_gateway: StripeGateway) -> None:
    try:
        tax = stripe_gateway.tax_settings()
    except StripeObjectMissing:
        tax = None
    except StripeFailure as failure:
        report.add("warn", "Stripe Tax", f"could not read the tax settings: {failure}")
        tax = None
    if tax is not None and getattr(tax, "status", None) == "active":
        report.add("warn", "Stripe Tax", "active on this account: the portal computes no tax, so invoices with "
                                         "automatic tax would total more at Stripe than in the portal (syncs "
                                         "stop with total_mismatch); keep automatic tax off for these invoices")
    elif tax is not None:
        report.add("ok", "Stripe Tax", "not active")
    try:
        coupon = stripe_gateway.any_coupon()
    except StripeFailure as failure:
        report.add("warn", "discounts", f"could not list coupons: {failure}")
        return
    if coupon is not None:
        report.add("warn", "discounts", f"the account has coupons (e.g. {coupon.id}): a discount on a customer or "
                                        "an invoice lowers Stripe's total below the portal's, which models none")
    else:
        report.add("ok", "discounts", "no coupons")
