"""Finalization and collection: the balance, the minimum charge, payment attempts.

Rules (see README "Fidelity" for the source of each):

* Finalizing applies the customer's balance (``starting_balance``; a positive balance
  is owed and is collected, a credit is used up to the total) and updates the
  customer's balance.
* An amount due above 0 but below the minimum charge of the invoice's currency is not
  charged: the invoice is marked paid and the amount is added to the customer's
  balance, which the next finalized invoice collects (``amount_due`` reads 0,
  ``ending_balance`` shows the amount moved).
* With ``auto_advance`` and ``collection_method=charge_automatically`` the payment is
  attempted ``payment_delay`` seconds after finalization (``next_payment_attempt``),
  when the emulated clock gets there. It charges the invoice's default payment
  method, else the customer's ``invoice_settings.default_payment_method``, else its
  ``default_source``. A failure (none, or a declining card) counts an attempt,
  emits ``invoice.payment_failed`` and schedules the next attempt
  ``payment_retry_days`` after it (default 3, 5, 7 days); after the last one the
  invoice stays open with ``next_payment_attempt`` null. A card that needs
  authentication emits ``invoice.payment_action_required`` and is not retried.
* ``POST /v1/invoices/{id}/pay`` charges at once (402 ``card_error`` on a decline,
  400 without any payment method), ``paid_out_of_band=true`` marks it paid.
* Paid, void and uncollectible invoices have ``auto_advance`` false.

This module is a mixin of :class:`~stripe_emulator.store.Store`.
"""

from __future__ import annotations

from . import objects as O
from .errors import StripeError, no_such
from .payment_methods import TEST_CARDS, is_token, test_card_key

DEFAULT_PAYMENT_DELAY = 3600
DEFAULT_RETRY_DAYS = (3, 5, 7)

# Minimum charge per currency, in the currency's minor unit (JPY is zero-decimal).
MINIMUM_CHARGE = {"usd": 50, "eur": 50, "gbp": 30, "cad": 50, "aud": 50, "jpy": 50}
DEFAULT_MINIMUM_CHARGE = 50

NO_PAYMENT_METHOD = (
    "This customer has no attached payment source or default payment method. Please consider adding a default "
    "payment method. For more information, visit "
    "https://stripe.com/docs/billing/subscriptions/payment-methods-setting#payment-method-priority."
)
REQUIRES_ACTION = (
    "This payment requires additional user action before it can be completed successfully. Payment can be "
    "completed using the PaymentIntent associated with the invoice. For more details see: "
    "https://stripe.com/docs/billing/subscriptions/overview#requires-action"
)
_FORCED_DECLINE = TEST_CARDS["chargeCustomerFail"]


def minimum_charge(currency: str) -> int:
    """Stripe's minimum charge for ``currency`` in its minor unit."""
    return MINIMUM_CHARGE.get(currency.lower(), DEFAULT_MINIMUM_CHARGE)


class Collection:
    """Store mixin: finalize, pay, void, mark uncollectible, scheduled attempts."""

    # ------------------------------------------------------------------ helpers
    def _writable_customer(self, inv_or_item: dict) -> dict:
        """The live customer of an invoice or item; a deleted one refuses every write
        ("prevents any further operations")."""
        cid = inv_or_item["customer"]
        c = self.customers.get(cid)
        if c is None or c.get("deleted"):
            raise no_such("customer", cid, "customer")
        return c

    def _auto_collects(self, inv: dict) -> bool:
        return bool(inv["auto_advance"]) and inv["collection_method"] == "charge_automatically"

    def _set_delinquent(self, cust: dict, value: bool) -> None:
        if cust.get("deleted") or cust["delinquent"] == value:
            return
        before = O.render_customer(cust)
        cust["delinquent"] = value
        after = O.render_customer(cust)
        self.emit("customer.updated", after, O.diff(before, after))

    def _updated(self, inv: dict, before: dict) -> dict:
        after = self.r_invoice(inv)
        prev = O.diff(before, after)
        if prev:
            self.emit("invoice.updated", after, prev)
        return after

    # ------------------------------------------------------------------ finalize
    def finalize_invoice(self, iid: str, p: dict) -> dict:
        """POST /v1/invoices/{id}/finalize"""
        inv = self._invoice(iid, "id")
        self._writable_customer(inv)
        if inv["status"] != "draft":
            raise StripeError(
                f"This invoice is already finalized, you can't re-finalize a non-draft invoice. "
                f"Invoice {inv['id']} is {inv['status']}.",
            )
        if "auto_advance" in p:
            inv["auto_advance"] = p["auto_advance"]
        self._finalize(inv)
        return self.r_invoice(inv)

    def _finalize(self, inv: dict, collect: bool = True) -> None:
        """draft → open: number, URLs, balance, minimum charge; then paid, or a payment
        attempt scheduled (``collect=False``: the caller charges at once)."""
        cust = self.customers[inv["customer"]]
        before = self._snap(inv)
        now = self.now()
        inv["status"] = "open"
        inv["last_finalization_error"] = None
        if inv["number"] is None:
            seq = cust["next_invoice_sequence"]
            cust["next_invoice_sequence"] = seq + 1
            inv["number"] = f"{cust['invoice_prefix']}-{seq:04d}"
        inv["hosted_invoice_url"] = f"{self.base_url}/i/{inv['id']}"
        inv["invoice_pdf"] = f"{self.base_url}/i/{inv['id']}/pdf"
        inv["status_transitions"]["finalized_at"] = now
        inv["effective_at"] = inv["effective_at"] or now
        if inv["collection_method"] == "send_invoice" and inv["due_date"] is None:
            inv["due_date"] = now + 86400 * (inv["days_until_due"] or 0)
        inv["customer_snapshot"] = O.customer_snapshot(cust)
        total = sum(it["amount"] for it in self._inv_items(inv))
        inv["starting_balance"] = cust["balance"]
        net = total + cust["balance"]
        due = max(0, net)
        deferred = due if 0 < due < minimum_charge(inv["currency"]) else 0
        inv["deferred_to_balance"] = deferred
        new_balance = min(0, net) + deferred
        if new_balance != cust["balance"]:
            c_before = O.render_customer(cust)
            cust["balance"] = new_balance
            c_after = O.render_customer(cust)
            self.emit("customer.updated", c_after, O.diff(c_before, c_after))
        to_collect = due - deferred > 0
        scheduled = collect and to_collect and self._auto_collects(inv)
        inv["next_payment_attempt"] = now + self.payment_delay if scheduled else None
        after = self.r_invoice(inv)
        self.emit("invoice.finalized", after)
        self.emit("invoice.updated", after, O.diff(before, after))
        if not to_collect:
            self._mark_paid(inv)
        elif scheduled:
            if self.payment_delay <= 0:
                self._attempt_payment(inv, manual=False)
            else:
                self._push_due(inv["next_payment_attempt"], "pay", inv["id"])

    def _scheduled_finalize(self, inv: dict) -> None:
        """The clock reached ``automatically_finalizes_at``."""
        try:
            self._writable_customer(inv)
        except StripeError as e:
            self._finalization_failed(inv, e)
            return
        self._finalize(inv)

    def _finalization_failed(self, inv: dict, err: StripeError) -> None:
        """``invoice.finalization_failed``: the draft stays a draft, unscheduled."""
        before = self._snap(inv)
        inv["last_finalization_error"] = {
            "type": err.type,
            "code": err.code,
            "message": err.message,
            "param": err.param,
            "doc_url": err.body()["error"]["doc_url"],
        }
        inv["automatically_finalizes_at"] = None
        inv["_afa_explicit"] = None
        after = self._updated(inv, before)
        self.emit("invoice.finalization_failed", after)

    # ------------------------------------------------------------------ collection
    def _mark_paid(self, inv: dict, out_of_band: bool = False, before: dict | None = None) -> None:
        before = before if before is not None else self._snap(inv)
        totals = O.invoice_totals(inv, self._inv_items(inv))
        inv["amount_paid"] = totals["amount_due"]
        inv["status"] = "paid"
        inv["auto_advance"] = False
        inv["paid_out_of_band"] = out_of_band
        inv["status_transitions"]["paid_at"] = self.now()
        inv["next_payment_attempt"] = None
        after = self.r_invoice(inv)
        self.emit("invoice.updated", after, O.diff(before, after))
        self.emit("invoice.paid", after)
        if not out_of_band:
            self.emit("invoice.payment_succeeded", after)
        self._set_delinquent(self.customers[inv["customer"]], False)

    def _attempt_payment(self, inv: dict, manual: bool, method: dict | None = None) -> None:
        """Charge an open invoice. ``manual`` (``/pay``) raises the card error; an
        automatic attempt schedules the next retry instead."""
        cust = self.customers[inv["customer"]]
        before = self._snap(inv)
        if cust.get("deleted"):  # nothing more happens for a deleted customer
            inv["next_payment_attempt"] = None
            self._updated(inv, before)
            return
        method = method or self._default_payment_method(cust, inv)
        if inv["customer"] in self.fail_customers:
            card = _FORCED_DECLINE
        elif method is None:
            card = None
        else:
            card = self.test_card_of(method)
        # Any attempt counts as the first; later only automatic retries count.
        first = inv["attempt_count"] == 0
        counts = first or not manual
        inv["attempted"] = True
        if counts:
            inv["attempt_count"] += 1
        if card is not None and card.outcome == "succeeds":
            self._mark_paid(inv, before=before)
            return
        now = self.now()
        if card is not None and card.outcome == "requires_action":
            inv["next_payment_attempt"] = None
            after = self._updated(inv, before)
            self.emit("invoice.payment_action_required", after)
            if manual:
                raise StripeError(
                    REQUIRES_ACTION, status=402, type="card_error", code="invoice_payment_intent_requires_action"
                )
            return
        if counts:
            days = self.payment_retry_days
            n = inv["attempt_count"]
            if self._auto_collects(inv) and n <= len(days):
                inv["next_payment_attempt"] = now + int(days[n - 1] * 86400)
                self._push_due(inv["next_payment_attempt"], "pay", inv["id"])
            else:
                inv["next_payment_attempt"] = None
        after = self._updated(inv, before)
        self.emit("invoice.payment_failed", after)
        if not manual:
            self._set_delinquent(cust, True)
            return
        if card is None:
            raise StripeError(NO_PAYMENT_METHOD)
        raise card.card_error()

    def _pay_method(self, inv: dict, p: dict) -> dict | None:
        """The payment method ``/pay`` names (``payment_method`` or ``source``), if any."""
        if p.get("mandate"):
            raise no_such("mandate", p["mandate"], "mandate")
        for param in ("payment_method", "source"):
            ref = p.get(param)
            if not ref:
                continue
            if is_token(ref):
                key = test_card_key(ref)
                if key is None:
                    raise no_such("PaymentMethod" if param == "payment_method" else "token", ref, param)
                return self._new_payment_method(key, "pm" if param == "payment_method" else "card")
            rec = self.payment_methods.get(ref)
            if rec is None or rec["customer"] not in (None, inv["customer"]):
                raise no_such("PaymentMethod" if param == "payment_method" else "source", ref, param)
            return rec
        return None

    def pay_invoice(self, iid: str, p: dict) -> dict:
        """POST /v1/invoices/{id}/pay (a draft is finalized first, as Stripe does)"""
        inv = self._invoice(iid, "id")
        cust = self._writable_customer(inv)
        if inv["status"] == "paid":
            raise StripeError("Invoice is already paid.")
        if inv["status"] == "void":
            raise StripeError("This invoice has been voided and can no longer be paid.")
        method = self._pay_method(inv, p)
        if inv["status"] == "draft":
            self._finalize(inv, collect=False)
            if inv["status"] == "paid":
                return self.r_invoice(inv)
        if p.get("paid_out_of_band"):
            self._mark_paid(inv, out_of_band=True)
            return self.r_invoice(inv)
        if O.invoice_totals(inv, self._inv_items(inv))["amount_remaining"] == 0:
            self._mark_paid(inv)
            return self.r_invoice(inv)
        nothing_to_charge = method is None and self._default_payment_method(cust, inv) is None
        if nothing_to_charge and inv["customer"] not in self.fail_customers:
            raise StripeError(NO_PAYMENT_METHOD)
        self._attempt_payment(inv, manual=True, method=method)
        return self.r_invoice(inv)

    def _auto_advance_changed(self, inv: dict) -> None:
        """``auto_advance`` toggled on an open invoice: stop, or resume, collection."""
        if inv["status"] != "open":
            return
        if not self._auto_collects(inv):
            inv["next_payment_attempt"] = None
        elif inv["next_payment_attempt"] is None and inv["attempt_count"] <= len(self.payment_retry_days):
            inv["next_payment_attempt"] = self.now() + self.payment_delay
            self._push_due(inv["next_payment_attempt"], "pay", inv["id"])

    # ------------------------------------------------------------------ void / uncollectible
    def void_invoice(self, iid: str, p: dict) -> dict:
        """POST /v1/invoices/{id}/void (open or uncollectible invoices)"""
        inv = self._invoice(iid, "id")
        self._writable_customer(inv)
        if inv["status"] not in ("open", "uncollectible"):
            raise StripeError(
                f"You can only void open or uncollectible invoices; invoice {inv['id']} is {inv['status']}.",
            )
        return self._end_collection(inv, "void", "voided_at", "invoice.voided")

    def mark_uncollectible(self, iid: str, p: dict) -> dict:
        """POST /v1/invoices/{id}/mark_uncollectible (open invoices)"""
        inv = self._invoice(iid, "id")
        cust = self._writable_customer(inv)
        if inv["status"] != "open":
            raise StripeError(
                f"You can only mark open invoices as uncollectible; invoice {inv['id']} is {inv['status']}.",
            )
        out = self._end_collection(inv, "uncollectible", "marked_uncollectible_at", "invoice.marked_uncollectible")
        self._set_delinquent(cust, False)
        return out

    def _end_collection(self, inv: dict, status: str, transition: str, event_type: str) -> dict:
        """Move an open invoice to a status where Stripe stops collecting it."""
        before = self._snap(inv)
        inv["status"] = status
        inv["auto_advance"] = False
        inv["status_transitions"][transition] = self.now()
        inv["next_payment_attempt"] = None
        after = self.r_invoice(inv)
        self.emit("invoice.updated", after, O.diff(before, after))
        self.emit(event_type, after)
        return self.r_invoice(inv)
