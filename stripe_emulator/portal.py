"""Customer portal: configurations and sessions.

A session needs a configuration: the one named by ``configuration``, else the
account's default one. A test-mode account has a default configuration only once its
portal settings were saved in the Dashboard; until then a session without
``configuration`` is refused (400, Stripe's message). The emulator stands in for that
Dashboard save with ``portal_default_configuration`` (control API, CLI flag), which
creates a configuration with ``is_default: true``. Configurations created through the
API have ``is_default: false``.

The session's ``url`` serves a page (see :mod:`stripe_emulator.pages`) where a person
can add a test card as the customer's default payment method.

This module is a mixin of :class:`~stripe_emulator.store.Store`.
"""

from __future__ import annotations

import copy

from . import objects as O
from .errors import StripeError, missing_param, no_such
from .params import apply_metadata, check_metadata

NO_DEFAULT_CONFIGURATION = (
    "You can’t create a portal session in test mode until you save your customer portal settings in test mode at "
    "https://dashboard.stripe.com/test/settings/billing/portal."
)

_DEFAULT_FEATURES = {
    "customer_update": {"allowed_updates": ["email", "tax_id"], "enabled": True},
    "invoice_history": {"enabled": True},
    "payment_method_update": {"enabled": True, "payment_method_configuration": None},
    "subscription_cancel": {
        "cancellation_reason": {"enabled": False, "options": []},
        "enabled": False,
        "mode": "at_period_end",
        "proration_behavior": "none",
    },
    "subscription_update": {
        "billing_cycle_anchor": None,
        "default_allowed_updates": [],
        "enabled": False,
        "proration_behavior": "none",
        "schedule_at_period_end": {"conditions": []},
        "trial_update_behavior": "end_trial",
    },
}

# Payment methods the portal page offers: (token, button label).
PORTAL_CARDS = (
    ("pm_card_visa", "Add Visa •••• 4242"),
    ("pm_card_chargeCustomerFail", "Add a card that declines"),
)


def _merge(base: dict, update: dict) -> dict:
    """``base`` with ``update`` laid over it (``""`` values mean empty)."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = [] if v == "" and isinstance(out.get(k), list) else (None if v == "" else copy.deepcopy(v))
    return out


class BillingPortal:
    """Store mixin: ``billing_portal.configuration`` and ``billing_portal.session``."""

    def _reset_portal(self) -> None:
        self.portal_configurations: dict[str, dict] = {}
        self.sessions: dict[str, dict] = {}

    # ------------------------------------------------------------------ default configuration
    def default_portal_configuration(self) -> dict | None:
        """The account's default configuration (the emulated Dashboard save), if any."""
        return next((c for c in self.portal_configurations.values() if c["is_default"]), None)

    def set_portal_default_configuration(self, enabled: bool) -> dict | None:
        """Emulate saving (or not having saved) the portal settings in the Dashboard."""
        current = self.default_portal_configuration()
        if enabled and current is None:
            current = self._new_configuration({"features": {}}, is_default=True)
        elif not enabled and current is not None:
            del self.portal_configurations[current["id"]]
            current = None
        return current

    # ------------------------------------------------------------------ configurations
    def _configuration_fields(self, cfg: dict, p: dict) -> None:
        if "features" in p:
            cfg["features"] = _merge(cfg["features"], p["features"])
        if "business_profile" in p:
            cfg["business_profile"] = _merge(cfg["business_profile"], p["business_profile"])
        if "default_return_url" in p:
            cfg["default_return_url"] = p["default_return_url"] or None
        if "login_page" in p:
            enabled = bool(p["login_page"].get("enabled"))
            url = f"{self.base_url}/p/login/{cfg['id']}" if enabled else None
            cfg["login_page"] = {"enabled": enabled, "url": url}
        if "name" in p:
            cfg["name"] = p["name"] or None
        if "active" in p:
            if not p["active"] and cfg["is_default"]:
                raise StripeError("You cannot deactivate the default configuration.", param="active")
            cfg["active"] = p["active"]
        if "metadata" in p:
            if p["metadata"] != "":
                check_metadata(p["metadata"])
            cfg["metadata"] = apply_metadata(cfg["metadata"] or {}, p["metadata"])

    def _new_configuration(self, p: dict, is_default: bool = False) -> dict:
        now = self.now()
        cfg = {
            "id": self.new_id("bpc"),
            "_seq": self._seq(),
            "created": now,
            "updated": now,
            "active": True,
            "is_default": is_default,
            "features": copy.deepcopy(_DEFAULT_FEATURES),
            "business_profile": {"headline": None, "privacy_policy_url": None, "terms_of_service_url": None},
            "default_return_url": None,
            "login_page": {"enabled": False, "url": None},
            "metadata": {},
            "name": None,
        }
        self._configuration_fields(cfg, p)
        self.portal_configurations[cfg["id"]] = cfg
        return cfg

    def _configuration(self, cid, param: str = "configuration") -> dict:
        cfg = self.portal_configurations.get(cid) if isinstance(cid, str) else None
        if cfg is None:
            raise no_such("configuration", str(cid), param)
        return cfg

    def create_portal_configuration(self, p: dict) -> dict:
        """POST /v1/billing_portal/configurations (``is_default: false``)"""
        cfg = self._new_configuration(p)
        out = O.render_portal_configuration(cfg)
        self.emit("billing_portal.configuration.created", out)
        return out

    def retrieve_portal_configuration(self, cid: str, p: dict) -> dict:
        """GET /v1/billing_portal/configurations/{id}"""
        return O.render_portal_configuration(self._configuration(cid, "configuration"))

    def update_portal_configuration(self, cid: str, p: dict) -> dict:
        """POST /v1/billing_portal/configurations/{id}"""
        cfg = self._configuration(cid, "configuration")
        before = O.render_portal_configuration(cfg)
        staged = copy.deepcopy(cfg)
        self._configuration_fields(staged, p)
        cfg.update(staged)
        after = O.render_portal_configuration(cfg)
        prev = O.diff(before, after)
        if prev:
            cfg["updated"] = self.now()
            after = O.render_portal_configuration(cfg)
            self.emit("billing_portal.configuration.updated", after, prev)
        return after

    def list_portal_configurations(self, p: dict) -> dict:
        """GET /v1/billing_portal/configurations (filters: active, is_default)"""
        recs = [
            c
            for c in self.portal_configurations.values()
            if ("active" not in p or c["active"] == p["active"])
            and ("is_default" not in p or c["is_default"] == p["is_default"])
        ]
        recs.sort(key=lambda r: -r["_seq"])
        return self._paginate(
            recs, p, "/v1/billing_portal/configurations", O.render_portal_configuration, "configuration"
        )

    # ------------------------------------------------------------------ sessions
    def create_portal_session(self, p: dict) -> dict:
        """POST /v1/billing_portal/sessions"""
        if p.get("customer_account"):
            raise no_such("account", p["customer_account"], "customer_account")
        if "customer" not in p:
            raise missing_param("customer")
        cust = self._customer(p["customer"], "customer")
        if p.get("on_behalf_of"):
            raise no_such("account", p["on_behalf_of"], "on_behalf_of")
        if p.get("configuration"):
            cfg = self._configuration(p["configuration"], "configuration")
            if not cfg["active"]:
                raise StripeError(
                    f"The configuration {cfg['id']} is inactive and cannot be used to create a portal session.",
                    param="configuration",
                )
        else:
            cfg = self.default_portal_configuration()
            if cfg is None:
                raise StripeError(NO_DEFAULT_CONFIGURATION)
        sid = self.new_id("bps")
        s = {
            "id": sid,
            "created": self.now(),
            "customer": cust["id"],
            "configuration": cfg["id"],
            "return_url": p.get("return_url") or cfg["default_return_url"],
            "locale": p.get("locale"),
            "url": f"{self.base_url}/p/session/{sid}",
        }
        self.sessions[sid] = s
        out = O.render_session(s)
        self.emit("billing_portal.session.created", out)
        return out

    def portal_add_card(self, sid: str, token: str) -> dict:
        """The portal page's "add a card" form: attach a test card and make it the
        customer's default payment method (the same events as the API)."""
        s = self.sessions.get(sid)
        if s is None:
            raise no_such("billing_portal.session", sid, "id")
        if token not in dict(PORTAL_CARDS):
            raise StripeError("This page only adds its own test cards.", param="payment_method")
        return self.update_customer(s["customer"], {"invoice_settings": {"default_payment_method": token}})
