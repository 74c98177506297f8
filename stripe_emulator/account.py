"""The account and its settings: ``GET /v1/account``, webhook endpoints, and the two
settings a billing integration checks before trusting Stripe's totals (Stripe Tax
settings, coupons).

The webhook endpoint the emulator delivers to (``--webhook-url``, or ``url`` set
through the control API) is listed as an endpoint enabled for every event (``*``),
with ``api_version`` null (the account's default), as a Dashboard-made endpoint
would be. Endpoints created with ``POST /v1/webhook_endpoints`` are stored and
listed (their ``secret`` shown only in the creation response, as Stripe does) but
receive no deliveries: the emulator delivers to one endpoint only.
"""

from __future__ import annotations

import secrets

from .errors import StripeError, no_such
from .objects import API_VERSION

ACCOUNT_ID = "acct_1EmuEmulatorAcct"


def _no_requirements() -> dict:
    return {"alternatives": [], "current_deadline": None, "currently_due": [], "disabled_reason": None,
            "errors": [], "eventually_due": [], "past_due": [], "pending_verification": []}


class Account:
    """Store mixin: the account, ``webhook_endpoint``, ``tax.settings``, ``coupon``."""

    def _reset_account(self) -> None:
        self.webhook_endpoints: dict[str, dict] = {}
        self._delivery_endpoint: dict | None = None  # the --webhook-url one, by url
        # The account's default API version (what a request without Stripe-Version
        # gets, and what events for an endpoint with api_version null are shaped as).
        self.account_api_version = API_VERSION
        self.tax_status = "pending"  # "active" once Stripe Tax is set up in the Dashboard
        self.coupons: dict[str, dict] = {}

    # ------------------------------------------------------------------ account
    def retrieve_account(self, p: dict) -> dict:
        return {
            "id": ACCOUNT_ID,
            "object": "account",
            "business_profile": {"name": "Stripe emulator", "support_email": None, "url": None, "mcc": None,
                                 "product_description": None, "support_phone": None, "support_url": None,
                                 "support_address": None, "annual_revenue": None, "estimated_worker_count": None,
                                 "minority_owned_business_designation": None},
            "business_type": None,
            "capabilities": {"card_payments": "active", "transfers": "active"},
            "charges_enabled": True,
            "controller": {"type": "account"},
            "country": "US",
            "created": 1_600_000_000,
            "default_currency": "usd",
            "details_submitted": True,
            "email": "account@emulator.test",
            "external_accounts": {"object": "list", "data": [], "has_more": False,
                                  "url": f"/v1/accounts/{ACCOUNT_ID}/external_accounts"},
            "future_requirements": _no_requirements(),
            "metadata": {},
            "payouts_enabled": True,
            "requirements": _no_requirements(),
            "settings": {"dashboard": {"display_name": "Stripe emulator", "timezone": "Etc/UTC"},
                         "invoices": {"default_account_tax_ids": None, "hosted_payment_method_save": None}},
            "tos_acceptance": {"date": 1_600_000_000, "ip": None, "user_agent": None},
            "type": "standard",
        }

    # ------------------------------------------------------------------ webhook endpoints
    def _render_endpoint(self, rec: dict) -> dict:
        return {k: v for k, v in rec.items() if not k.startswith("_") and k != "secret"}

    def _endpoints(self) -> list[dict]:
        url = self.webhook_url()
        if url and (self._delivery_endpoint is None or self._delivery_endpoint["url"] != url):
            self._delivery_endpoint = self._new_endpoint(url, ["*"], None, "the emulator's delivery endpoint")
        elif not url:
            self._delivery_endpoint = None
        found = list(self.webhook_endpoints.values())
        if self._delivery_endpoint is not None:
            found.append(self._delivery_endpoint)
        return sorted(found, key=lambda rec: -rec["_seq"])

    def _new_endpoint(self, url: str, events: list[str], api_version: str | None, description: str | None) -> dict:
        return {
            "id": self.new_id("we"),
            "_seq": self._seq(),
            "object": "webhook_endpoint",
            "api_version": api_version,
            "application": None,
            "created": self.now(),
            "description": description,
            "enabled_events": events,
            "livemode": False,
            "metadata": {},
            "status": "enabled",
            "url": url,
            "secret": "whsec_" + secrets.token_hex(16),
        }

    def create_webhook_endpoint(self, p: dict) -> dict:
        for name in ("url", "enabled_events"):
            if not p.get(name):
                raise StripeError(f"Missing required param: {name}.", param=name, code="parameter_missing")
        if not str(p["url"]).startswith(("http://", "https://")):
            raise StripeError("Invalid URL: must be an http or https URL.", param="url", code="url_invalid")
        rec = self._new_endpoint(p["url"], list(p["enabled_events"]), p.get("api_version"), p.get("description"))
        if p.get("metadata"):
            rec["metadata"] = dict(p["metadata"])
        self.webhook_endpoints[rec["id"]] = rec
        return {**self._render_endpoint(rec), "secret": rec["secret"]}

    def retrieve_webhook_endpoint(self, eid: str, p: dict) -> dict:
        rec = next((r for r in self._endpoints() if r["id"] == eid), None)
        if rec is None:
            raise no_such("webhook_endpoint", eid, "id")
        return self._render_endpoint(rec)

    def delete_webhook_endpoint(self, eid: str, p: dict) -> dict:
        if self.webhook_endpoints.pop(eid, None) is None:
            raise no_such("webhook_endpoint", eid, "id")
        return {"id": eid, "object": "webhook_endpoint", "deleted": True}

    def list_webhook_endpoints(self, p: dict) -> dict:
        return self._paginate(self._endpoints(), p, "/v1/webhook_endpoints", self._render_endpoint,
                              "webhook_endpoint")

    # ------------------------------------------------------------------ settings the portal does not model
    def retrieve_tax_settings(self, p: dict) -> dict:
        return {
            "object": "tax.settings",
            "defaults": {"provider": "stripe", "tax_behavior": None, "tax_code": None},
            "head_office": None,
            "livemode": False,
            "status": self.tax_status,
            "status_details": {self.tax_status: {} if self.tax_status == "active" else {"missing_fields": []}},
        }

    def list_coupons(self, p: dict) -> dict:
        return self._paginate(list(self.coupons.values()), p, "/v1/coupons", dict, "coupon")
