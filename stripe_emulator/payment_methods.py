"""Payment methods: Stripe's test cards, attaching them to customers, listing them.

Stripe's test-mode PaymentMethod tokens (``pm_card_visa``...) and card tokens
(``tok_visa``...) name a test card (docs: "Testing", https://docs.stripe.com/testing).
Using a token where a payment method is expected creates a new PaymentMethod with its
own ``pm_...`` id; a token passed as a customer's ``source`` creates a legacy card
(``card_...``). Each test card behaves on every charge as Stripe documents it:

* succeeds: ``visa``, ``visa_debit``, ``mastercard``, ``mastercard_debit``,
  ``mastercard_prepaid``, ``amex``;
* declines and cannot be attached to a customer (402 ``card_error`` on attach):
  ``chargeDeclined`` / ``visa_chargeDeclined`` (``generic_decline``) and
  ``chargeDeclinedInsufficientFunds`` / ``visa_chargeDeclinedInsufficientFunds``
  (``insufficient_funds``) — they can still be passed to ``/v1/invoices/{id}/pay``;
* attaches, then every charge is declined: ``chargeCustomerFail``,
  ``visa_chargeCustomerFail``;
* attaches, then every charge needs the customer's authentication:
  ``authenticationRequired``.

This module is a mixin of :class:`~stripe_emulator.store.Store` (it shares its state
and lock).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import objects as O
from .errors import StripeError, missing_param, no_such


@dataclass(frozen=True)
class TestCard:
    """How one of Stripe's test cards behaves."""

    brand: str
    last4: str
    funding: str = "credit"
    attachable: bool = True
    outcome: str = "succeeds"  # succeeds | declines | requires_action
    code: str | None = None
    decline_code: str | None = None
    message: str | None = None

    def card_error(self) -> StripeError:
        """The 402 ``card_error`` a charge on (or an attach of) this card gets."""
        return StripeError(
            self.message or "Your card was declined.",
            status=402,
            type="card_error",
            code=self.code or "card_declined",
            decline_code=self.decline_code,
        )


_GENERIC = {
    "outcome": "declines",
    "code": "card_declined",
    "decline_code": "generic_decline",
    "message": "Your card was declined.",
}
_FUNDS = {
    "outcome": "declines",
    "code": "card_declined",
    "decline_code": "insufficient_funds",
    "message": "Your card has insufficient funds.",
}

# Keyed by what follows "pm_card_" / "tok_".
TEST_CARDS: dict[str, TestCard] = {
    "visa": TestCard("visa", "4242"),
    "visa_debit": TestCard("visa", "5556", "debit"),
    "mastercard": TestCard("mastercard", "4444"),
    "mastercard_debit": TestCard("mastercard", "8210", "debit"),
    "mastercard_prepaid": TestCard("mastercard", "5100", "prepaid"),
    "amex": TestCard("amex", "8431"),
    "chargeDeclined": TestCard("visa", "0002", attachable=False, **_GENERIC),
    "visa_chargeDeclined": TestCard("visa", "0002", attachable=False, **_GENERIC),
    "chargeDeclinedInsufficientFunds": TestCard("visa", "9995", attachable=False, **_FUNDS),
    "visa_chargeDeclinedInsufficientFunds": TestCard("visa", "9995", attachable=False, **_FUNDS),
    "chargeCustomerFail": TestCard("visa", "0341", **_GENERIC),
    "visa_chargeCustomerFail": TestCard("visa", "0341", **_GENERIC),
    "authenticationRequired": TestCard("visa", "3184", outcome="requires_action"),
}

PM_NOT_SOURCE = (
    "You cannot use a PaymentMethod as a source for Customers. Instead, use the PaymentMethods API to Attach a "
    "Customer to a PaymentMethod. See https://stripe.com/docs/api/payment_methods/attach"
)


def test_card_key(token: str) -> str | None:
    """``"visa"`` for ``pm_card_visa`` / ``tok_visa``; None for anything else."""
    for prefix in ("pm_card_", "tok_"):
        if token.startswith(prefix) and token[len(prefix) :] in TEST_CARDS:
            return token[len(prefix) :]
    return None


def is_token(ref: str) -> bool:
    """Does ``ref`` look like a test token (known or not)?"""
    return ref.startswith("pm_card_") or ref.startswith("tok_")


class PaymentMethods:
    """Store mixin: PaymentMethod objects and a customer's default payment method."""

    def _reset_payment_methods(self) -> None:
        self.payment_methods: dict[str, dict] = {}

    # ------------------------------------------------------------------ records
    def _new_payment_method(self, key: str, prefix: str = "pm") -> dict:
        tc = TEST_CARDS[key]
        rec = {
            "id": self.new_id(prefix),
            "_seq": self._seq(),
            "created": self.now(),
            "customer": None,
            "test": key,
            "card": {
                "brand": tc.brand,
                "last4": tc.last4,
                "funding": tc.funding,
                "exp_month": 12,
                "exp_year": 2034,
                "fingerprint": f"emu{key[:13]}",
            },
            "metadata": {},
        }
        self.payment_methods[rec["id"]] = rec
        return rec

    def r_payment_method(self, rec: dict) -> dict:
        """Render a payment method (``card_`` sources render as cards)."""
        return O.render_card(rec) if rec["id"].startswith("card_") else O.render_payment_method(rec)

    def test_card_of(self, rec: dict) -> TestCard:
        """The test card a payment method record stands for."""
        return TEST_CARDS[rec["test"]]

    def _known_payment_method(self, ref, param: str) -> dict:
        rec = self.payment_methods.get(ref) if isinstance(ref, str) else None
        if rec is None:
            raise no_such("PaymentMethod", str(ref), param)
        return rec

    def _check_token(self, ref: str, param: str) -> str:
        """The test card key of a token, or a 404 for an unknown one."""
        key = test_card_key(ref)
        if key is None:
            raise no_such("PaymentMethod", ref, param)
        return key

    def _check_attachable(self, ref: str, cust: dict, param: str) -> str | None:
        """Validate ``ref`` (token or ``pm_`` id) for attaching to ``cust``; nothing
        changes. Returns the token's card key (None for an existing payment method)."""
        if is_token(ref):
            key = self._check_token(ref, param)
            if not TEST_CARDS[key].attachable:
                raise TEST_CARDS[key].card_error()
            return key
        rec = self._known_payment_method(ref, param)
        if rec["customer"] not in (None, cust["id"]):
            raise StripeError("The payment method you provided has already been attached to a customer.", param=param)
        if not self.test_card_of(rec).attachable:
            raise self.test_card_of(rec).card_error()
        return None

    def _attach_pm(self, ref: str, cust: dict, key: str | None) -> tuple[dict, bool]:
        """Attach (after :meth:`_check_attachable`); returns (record, newly attached)."""
        rec = self._new_payment_method(key) if key is not None else self.payment_methods[ref]
        if rec["customer"] == cust["id"]:
            return rec, False
        rec["customer"] = cust["id"]
        return rec, True

    def _emit_attached(self, recs: list[dict]) -> None:
        for rec in recs:
            self.emit("payment_method.attached", self.r_payment_method(rec))

    # ------------------------------------------------------------------ customers
    def _plan_customer_payment_methods(self, c: dict, p: dict, creating: bool):
        """Validate the payment-method parameters of a customer create/update
        (``payment_method``, ``invoice_settings[default_payment_method]``, ``source``,
        ``default_source``) without changing anything; return a function that applies
        them (after the customer exists) and returns the newly attached records."""
        pm_ref = p.get("payment_method") or None
        settings = p.get("invoice_settings") or {}
        default_ref = settings.get("default_payment_method") if isinstance(settings, dict) else None
        source_ref = p.get("source") or None
        default_source_ref = p.get("default_source") or None
        pm_key = default_key = source_key = None
        if pm_ref:
            pm_key = self._check_attachable(pm_ref, c, "payment_method")
        if default_ref:
            param = "invoice_settings[default_payment_method]"
            if default_ref == pm_ref:
                pass  # the method attached in this same call
            elif is_token(default_ref):
                default_key = self._check_attachable(default_ref, c, param)
            else:
                rec = self._known_payment_method(default_ref, param)
                if rec["customer"] != c["id"]:
                    raise StripeError(
                        f"The customer does not have a payment method with the ID {default_ref}. The payment "
                        "method must be attached to the customer.",
                        param=param,
                    )
        if source_ref:
            if source_ref.startswith("pm_"):
                raise StripeError(PM_NOT_SOURCE, param="source")
            source_key = test_card_key(source_ref) if source_ref.startswith("tok_") else None
            if source_key is None:
                raise no_such("token", source_ref, "source")
            if not TEST_CARDS[source_key].attachable:
                raise TEST_CARDS[source_key].card_error()
        if default_source_ref:
            rec = self.payment_methods.get(default_source_ref)
            if rec is None or not default_source_ref.startswith("card_") or rec["customer"] != c["id"]:
                raise no_such("source", default_source_ref, "default_source")

        def apply() -> list[dict]:
            attached = []
            chosen = None
            if pm_ref:
                rec, new = self._attach_pm(pm_ref, c, pm_key)
                attached += [rec] if new else []
                if default_ref == pm_ref:
                    chosen = rec["id"]
            if default_ref and default_ref != pm_ref:
                if default_key is not None:
                    rec, new = self._attach_pm(default_ref, c, default_key)
                    attached += [rec] if new else []
                    chosen = rec["id"]
                else:
                    chosen = default_ref
            if chosen is not None:
                c["invoice_settings"]["default_payment_method"] = chosen
            elif isinstance(settings, dict) and settings.get("default_payment_method") == "":
                c["invoice_settings"]["default_payment_method"] = None
            if source_ref:
                card = self._new_payment_method(source_key, "card")
                card["customer"] = c["id"]
                c["default_source"] = card["id"]  # `source` replaces the default source
            if default_source_ref:
                c["default_source"] = default_source_ref
            return attached

        return apply

    def _forget_payment_methods(self, cid: str) -> None:
        """A deleted customer's cards are removed from it (Stripe: "Deleting customers
        removes all credit card details")."""
        for rec in self.payment_methods.values():
            if rec["customer"] == cid:
                rec["customer"] = None

    def _default_payment_method(self, cust: dict, inv: dict | None = None) -> dict | None:
        """What an invoice charges: the invoice's default payment method, then the
        customer's ``invoice_settings.default_payment_method``, then its
        ``default_source`` (Stripe's documented order)."""
        for ref in (
            inv.get("default_payment_method") if inv else None,
            cust["invoice_settings"].get("default_payment_method"),
            cust.get("default_source"),
        ):
            if ref and ref in self.payment_methods:
                return self.payment_methods[ref]
        return None

    # ------------------------------------------------------------------ endpoints
    def attach_payment_method(self, pm_id: str, p: dict) -> dict:
        """POST /v1/payment_methods/{id}/attach"""
        if p.get("customer_account"):
            raise no_such("account", p["customer_account"], "customer_account")
        if "customer" not in p:
            raise missing_param("customer")
        cust = self._customer(p["customer"], "customer")
        key = self._check_attachable(pm_id, cust, "payment_method")
        rec, new = self._attach_pm(pm_id, cust, key)
        if new:
            self._emit_attached([rec])
        return self.r_payment_method(rec)

    def detach_payment_method(self, pm_id: str, p: dict) -> dict:
        """POST /v1/payment_methods/{id}/detach"""
        rec = self._known_payment_method(pm_id, "payment_method")
        if rec["customer"] is None:
            raise StripeError(
                "The payment method you provided is not attached to a customer so detachment is impossible.",
                param="payment_method",
            )
        cust = self._customer(rec["customer"], "customer")
        before = O.render_customer(cust)
        rec["customer"] = None
        if cust["invoice_settings"].get("default_payment_method") == pm_id:
            cust["invoice_settings"]["default_payment_method"] = None
        if cust.get("default_source") == pm_id:
            cust["default_source"] = None
        out = self.r_payment_method(rec)
        self.emit("payment_method.detached", out, {"customer": cust["id"]})
        after = O.render_customer(cust)
        if before != after:
            self.emit("customer.updated", after, O.diff(before, after))
        return out

    def retrieve_payment_method(self, pm_id: str, p: dict) -> dict:
        """GET /v1/payment_methods/{id} (a test token gives a new, unattached one)"""
        if is_token(pm_id):
            return self.r_payment_method(self._new_payment_method(self._check_token(pm_id, "payment_method")))
        return self.r_payment_method(self._known_payment_method(pm_id, "payment_method"))

    def _list_payment_methods(self, recs: list[dict], p: dict, url: str) -> dict:
        if p.get("type") not in (None, "card"):
            recs = []
        recs = sorted(recs, key=lambda r: -r["_seq"])
        return self._paginate(recs, p, url, self.r_payment_method, "PaymentMethod")

    def list_payment_methods(self, p: dict) -> dict:
        """GET /v1/payment_methods (filters: customer, type)"""
        if "customer" in p:
            self._customer(p["customer"], "customer")
        cid = p.get("customer")
        recs = [r for r in self.payment_methods.values() if r["id"].startswith("pm_") and r["customer"] == cid]
        return self._list_payment_methods(recs, p, "/v1/payment_methods")

    def list_customer_payment_methods(self, cid: str, p: dict) -> dict:
        """GET /v1/customers/{id}/payment_methods (cards added as sources included)"""
        cust = self._customer(cid, "customer")
        recs = [r for r in self.payment_methods.values() if r["customer"] == cust["id"]]
        return self._list_payment_methods(recs, p, f"/v1/customers/{cid}/payment_methods")

    def retrieve_customer_payment_method(self, cid: str, pm_id: str, p: dict) -> dict:
        """GET /v1/customers/{id}/payment_methods/{pm}"""
        cust = self._customer(cid, "customer")
        rec = self.payment_methods.get(pm_id)
        if rec is None or rec["customer"] != cust["id"]:
            raise no_such("PaymentMethod", pm_id, "payment_method")
        return self.r_payment_method(rec)
