"""The emulator's state and Stripe's business rules.

:class:`Store` holds customers, invoices, invoice items (each item on an invoice is
also that invoice's line, with its own ``il_`` id) and events, and implements every
API operation on them; payment methods (:mod:`~stripe_emulator.payment_methods`),
finalization and collection (:mod:`~stripe_emulator.payments`) and the customer
portal (:mod:`~stripe_emulator.portal`) are mixins sharing its state. Callers hold
``store.lock`` around each operation (the server does), receive validated parameters
(see :mod:`stripe_emulator.params`) and get back rendered Stripe objects.

Rules reproduced here (see the emulator's README): totals recomputed from the items on
every change; items only on draft invoices, at most 250 per invoice; edits after
finalization refused (``invoice_not_editable``); ``pending_invoice_items_behavior``;
``auto_advance`` and ``automatically_finalizes_at`` (scheduled only with
``auto_advance``; finalized when the emulated clock reaches it); a draft shows the
customer's current balance; a deleted customer refuses every write to its invoices
and items; delete-draft; bulk line operations that validate every line before
changing anything. Work the clock makes due (scheduled finalizations and payment
attempts) runs in time order at its own scheduled time (:meth:`Store.run_due`).
"""

from __future__ import annotations

import heapq
import itertools
import json
import random
import string
import threading
from decimal import ROUND_HALF_UP, Decimal

from . import objects as O
from .account import Account
from .clock import Clock
from .errors import StripeError, missing_param, no_such
from .params import apply_metadata, check_metadata
from .payment_methods import PaymentMethods
from .payments import DEFAULT_PAYMENT_DELAY, DEFAULT_RETRY_DAYS, Collection
from .portal import BillingPortal

MAX_ITEMS_PER_INVOICE = 250
MAX_EVENTS = 200_000
FIVE_YEARS = 5 * 366 * 86400
Q12 = Decimal("1e-12")
_ALNUM = string.ascii_letters + string.digits
_B62 = string.digits + string.ascii_uppercase + string.ascii_lowercase


def _b62(n: int, width: int) -> str:
    out = []
    while n:
        n, r = divmod(n, 62)
        out.append(_B62[r])
    return "".join(reversed(out)).rjust(width, "0")


def round_amount(d: Decimal) -> int:
    """Round a decimal amount to an integer minor-unit amount (half away from zero)."""
    return int(d.to_integral_value(rounding=ROUND_HALF_UP))


def not_editable(message: str, param: str | None = None) -> StripeError:
    """Stripe's refusal to change a finalized invoice or its items."""
    return StripeError(message, code="invoice_not_editable", param=param)


class Store(PaymentMethods, Collection, BillingPortal, Account):
    """All objects plus the operations of the emulated endpoints."""

    def __init__(self, clock: Clock, *, max_bulk_lines: int = 50, base_url: str = "") -> None:
        self.lock = threading.RLock()
        self.clock = clock
        self.max_bulk_lines = max_bulk_lines
        self.base_url = base_url
        self.payment_delay = DEFAULT_PAYMENT_DELAY  # seconds from finalization to the first attempt
        self.payment_retry_days: tuple = DEFAULT_RETRY_DAYS  # days after each failed attempt
        self._pinned: int | None = None  # the scheduled time of the work run_due is doing
        self.on_event = None  # callable(event_id, type, json_bytes), set by the server
        self.webhooks_configured = lambda: False
        self.webhook_url = lambda: None  # the endpoint webhooks are delivered to, set by the server
        self._rand = random.Random()
        self._tag = "".join(self._rand.choices(_ALNUM, k=10))
        self._counter = itertools.count(1)
        self.reset()

    # ------------------------------------------------------------------ plumbing
    def reset(self) -> None:
        """Forget every object, event and marked customer."""
        with self.lock:
            self.customers: dict[str, dict] = {}
            self.invoices: dict[str, dict] = {}
            self.items: dict[str, dict] = {}
            self.lines: dict[str, str] = {}  # il_ id -> ii_ id
            # Events are kept serialized (compact JSON) with their filterable fields:
            # {"id", "type", "created", "_seq", "json"}; the oldest are dropped past
            # MAX_EVENTS (Stripe itself keeps 30 days).
            self.events: list[dict] = []
            self.events_by_id: dict[str, dict] = {}
            self.fail_customers: set[str] = set()
            # (time, seq, "finalize" | "pay", invoice id); stale entries are skipped
            self._due: list[tuple[int, int, str, str]] = []
            self.request_ctx: tuple[str | None, str | None] = (None, None)
            self._reset_payment_methods()
            self._reset_portal()
            self._reset_account()

    def now(self) -> int:
        """Emulated time; while :meth:`run_due` works, the time the work was due."""
        return self._pinned if self._pinned is not None else self.clock.now()

    def _push_due(self, at: int, kind: str, iid: str) -> None:
        heapq.heappush(self._due, (at, self._seq(), kind, iid))

    def new_id(self, prefix: str) -> str:
        """A fresh Stripe-looking id (``cus_1Emu<process tag><counter>``), unique per process
        and, through the random process tag, across restarts."""
        return f"{prefix}_1Emu{self._tag}{_b62(next(self._counter), 10)}"

    def _seq(self) -> int:
        return next(self._counter)

    def emit(self, type_: str, obj: dict, previous: dict | None = None) -> dict:
        """Record an event (and hand it to the webhook dispatcher)."""
        req_id, idem = self.request_ctx
        ev = O.render_event(
            self.new_id("evt"),
            type_,
            self.now(),
            obj,
            previous,
            req_id,
            idem,
            1 if self.webhooks_configured() else 0,
        )
        body = json.dumps(ev).encode()
        rec = {"id": ev["id"], "type": type_, "created": ev["created"], "_seq": self._seq(), "json": body}
        self.events.append(rec)
        self.events_by_id[rec["id"]] = rec
        if len(self.events) > MAX_EVENTS:
            drop = self.events[: len(self.events) - MAX_EVENTS // 2]
            del self.events[: len(drop)]
            for old in drop:
                self.events_by_id.pop(old["id"], None)
        if self.on_event is not None:
            self.on_event(rec["id"], type_, body)
        return ev

    @staticmethod
    def public_event(rec: dict) -> dict:
        """The event object of a stored event record."""
        return json.loads(rec["json"])

    # ------------------------------------------------------------------ helpers
    def _customer(self, cid, param="customer", allow_deleted=False) -> dict:
        c = self.customers.get(cid) if isinstance(cid, str) else None
        if c is None or (c.get("deleted") and not allow_deleted):
            raise no_such("customer", str(cid), param)
        return c

    def _invoice(self, iid, param="invoice") -> dict:
        inv = self.invoices.get(iid) if isinstance(iid, str) else None
        if inv is None or inv.get("deleted"):
            raise no_such("invoice", str(iid), param)
        return inv

    def _item(self, iid, param="id") -> dict:
        it = self.items.get(iid)
        if it is None or it.get("deleted"):
            raise no_such("invoiceitem", str(iid), param)
        return it

    def _inv_items(self, inv: dict) -> list[dict]:
        items = self.items
        return [items[i] for i in inv["items"]]

    def r_invoice(self, inv: dict, with_lines: bool = True) -> dict:
        """Render an invoice record."""
        return O.render_invoice(inv, self.customers.get(inv["customer"]), self._inv_items(inv), with_lines)

    def _snap(self, inv: dict) -> dict:
        """Invoice snapshot for ``previous_attributes`` (lines are never diffed)."""
        return self.r_invoice(inv, with_lines=False)

    def r_customer(self, c: dict) -> dict:
        """Render a customer record."""
        return O.render_customer(c)

    def _paginate(self, records: list, p: dict, url: str, render, kind: str) -> dict:
        limit = p.get("limit", 10)
        if not 1 <= limit <= 100:
            raise StripeError(
                "Invalid limit: must be between 1 and 100", param="limit", code="parameter_invalid_integer"
            )
        sa, eb = p.get("starting_after"), p.get("ending_before")
        if sa is not None:
            idx = next((i for i, r in enumerate(records) if r["id"] == sa), None)
            if idx is None:
                raise no_such(kind, sa, "starting_after")
            window = records[idx + 1 : idx + 1 + limit]
            has_more = len(records) > idx + 1 + limit
        elif eb is not None:
            idx = next((i for i, r in enumerate(records) if r["id"] == eb), None)
            if idx is None:
                raise no_such(kind, eb, "ending_before")
            start = max(0, idx - limit)
            window = records[start:idx]
            has_more = start > 0
        else:
            window = records[:limit]
            has_more = len(records) > limit
        return O.render_list([render(r) for r in window], url, has_more)

    @staticmethod
    def _created_ok(ts: int, f) -> bool:
        if f is None:
            return True
        if isinstance(f, int):
            return ts == f
        return (
            ("gt" not in f or ts > f["gt"])
            and ("gte" not in f or ts >= f["gte"])
            and ("lt" not in f or ts < f["lt"])
            and ("lte" not in f or ts <= f["lte"])
        )

    # ------------------------------------------------------------------ expand
    def expand(self, obj: dict, paths: list[str] | None) -> dict:
        """Apply ``expand[]`` paths (``customer``, ``invoice``, ``data.customer``...)."""
        for path in paths or ():
            self._expand(obj, path.split("."), path, 0)
        return obj

    def _expand(self, obj, segs, full, depth):
        if depth > 4:
            raise StripeError("You cannot expand more than 4 levels of a property.", param="expand")
        key = segs[0]
        if isinstance(obj, dict) and obj.get("object") == "list" and key == "data":
            if len(segs) == 1:
                raise StripeError(f"This property cannot be expanded ({full}).", param="expand")
            for o in obj["data"]:
                self._expand(o, segs[1:], full, depth + 1)
            return
        if not isinstance(obj, dict) or key not in obj:
            raise StripeError(f"This property cannot be expanded ({full}).", param="expand")
        val = obj[key]
        if isinstance(val, str):
            rendered = self._render_ref(val)
            if rendered is None:
                raise StripeError(f"This property cannot be expanded ({full}).", param="expand")
            obj[key] = val = rendered
        elif val is not None and (not isinstance(val, dict) or (len(segs) == 1 and val.get("object") == "list")):
            raise StripeError(f"This property cannot be expanded ({full}).", param="expand")
        if len(segs) > 1 and isinstance(val, dict):
            self._expand(val, segs[1:], full, depth + 1)

    def _render_ref(self, ref: str):
        if ref.startswith("cus_") and ref in self.customers:
            return O.render_customer(self.customers[ref])
        if (ref.startswith("pm_") or ref.startswith("card_")) and ref in self.payment_methods:
            return self.r_payment_method(self.payment_methods[ref])
        if ref.startswith("bpc_") and ref in self.portal_configurations:
            return O.render_portal_configuration(self.portal_configurations[ref])
        if ref.startswith("in_") and ref in self.invoices:
            return self.r_invoice(self.invoices[ref])
        if ref.startswith("ii_") and ref in self.items:
            return O.render_item(self.items[ref])
        return None

    # ================================================================== customers
    def _customer_fields(self, c: dict, p: dict) -> None:
        for k in ("name", "email", "description", "phone"):
            if k in p:
                c[k] = p[k] or None
        if "address" in p:
            c["address"] = self._address(p["address"])
        if "shipping" in p:
            sh = p["shipping"]
            c["shipping"] = (
                None
                if sh == ""
                else {
                    "address": self._address(sh.get("address", {})),
                    "name": sh.get("name"),
                    "phone": sh.get("phone"),
                }
            )
        if "balance" in p:
            c["balance"] = p["balance"]
        if "invoice_prefix" in p:
            pre = p["invoice_prefix"]
            if not (3 <= len(pre) <= 12) or not pre.isalnum() or pre.upper() != pre:
                raise StripeError(
                    "Invalid invoice_prefix: must be 3-12 uppercase letters or numbers.", param="invoice_prefix"
                )
            c["invoice_prefix"] = pre
        if "next_invoice_sequence" in p:
            c["next_invoice_sequence"] = p["next_invoice_sequence"]
        if "preferred_locales" in p:
            c["preferred_locales"] = list(p["preferred_locales"])
        if "tax_exempt" in p:
            c["tax_exempt"] = p["tax_exempt"] or "none"
        if "invoice_settings" in p:
            s = p["invoice_settings"]
            for k in ("custom_fields", "footer", "rendering_options"):
                if k in s:
                    c["invoice_settings"][k] = s[k] or None
        if p.get("test_clock"):
            raise no_such("test_clock", p["test_clock"], "test_clock")
        if "metadata" in p:
            c["metadata"] = apply_metadata(c["metadata"], p["metadata"])

    @staticmethod
    def _address(a) -> dict | None:
        if a == "" or a is None:
            return None
        return {k: a.get(k) for k in ("city", "country", "line1", "line2", "postal_code", "state")}

    def create_customer(self, p: dict) -> dict:
        """POST /v1/customers"""
        cid = self.new_id("cus")
        c = {
            "id": cid,
            "_seq": self._seq(),
            "created": self.now(),
            "name": None,
            "email": None,
            "description": None,
            "phone": None,
            "address": None,
            "shipping": None,
            "balance": 0,
            "currency": None,
            "delinquent": False,
            "invoice_prefix": "".join(self._rand.choices(string.ascii_uppercase + string.digits, k=8)),
            "next_invoice_sequence": 1,
            "preferred_locales": [],
            "tax_exempt": "none",
            "invoice_settings": {
                "custom_fields": None,
                "default_payment_method": None,
                "footer": None,
                "rendering_options": None,
            },
            "default_source": None,
            "metadata": {},
        }
        apply_payment_methods = self._plan_customer_payment_methods(c, p, creating=True)
        self._customer_fields(c, p)
        self.customers[cid] = c
        attached = apply_payment_methods()
        out = O.render_customer(c)
        self.emit("customer.created", out)
        self._emit_attached(attached)
        return O.render_customer(c)

    def retrieve_customer(self, cid: str, p: dict) -> dict:
        """GET /v1/customers/{id} (a deleted customer answers its deleted stub)."""
        return O.render_customer(self._customer(cid, "id", allow_deleted=True))

    def update_customer(self, cid: str, p: dict) -> dict:
        """POST /v1/customers/{id}"""
        c = self._customer(cid, "id")
        before = O.render_customer(c)
        apply_payment_methods = self._plan_customer_payment_methods(c, p, creating=False)
        saved = {k: (dict(v) if isinstance(v, dict) else v) for k, v in c.items()}
        try:
            self._customer_fields(c, p)
        except StripeError:
            c.update(saved)
            raise
        self._emit_attached(apply_payment_methods())
        after = O.render_customer(c)
        prev = O.diff(before, after)
        if prev:
            self.emit("customer.updated", after, prev)
        return O.render_customer(c)

    def delete_customer(self, cid: str, p: dict) -> dict:
        """DELETE /v1/customers/{id}"""
        c = self._customer(cid, "id")
        last = O.render_customer(c)
        c["deleted"] = True
        self._forget_payment_methods(cid)
        self.emit("customer.deleted", last)
        return O.deleted(cid, "customer")

    def list_customers(self, p: dict) -> dict:
        """GET /v1/customers"""
        email, created = p.get("email"), p.get("created")
        recs = [
            c
            for c in self.customers.values()
            if not c.get("deleted")
            and (email is None or c["email"] == email)
            and self._created_ok(c["created"], created)
        ]
        recs.sort(key=lambda r: -r["_seq"])
        return self._paginate(recs, p, "/v1/customers", O.render_customer, "customer")

    # ================================================================== invoice items
    def _item_changes(self, p: dict, cur: dict | None, currency: str, prefix: str = "") -> dict:
        """New field values for an item (create when ``cur`` is None); no mutation."""

        def P(name: str) -> str:
            return f"{prefix}[{name}]" if prefix else name

        ch: dict = {}
        if p.get("pricing") and p["pricing"].get("price"):
            raise no_such("price", p["pricing"]["price"], P("pricing") + "[price]")
        if p.get("discounts"):
            d = p["discounts"][0]
            ref = d.get("coupon") or d.get("discount") or d.get("promotion_code") or ""
            kind = "coupon" if d.get("coupon") else ("discount" if d.get("discount") else "promotion code")
            raise no_such(kind, ref, P("discounts") + "[0]")
        if p.get("tax_rates"):
            raise no_such("tax rate", p["tax_rates"][0], P("tax_rates") + "[0]")
        if p.get("tax_amounts"):
            raise StripeError("The emulator does not support tax_amounts.", param=P("tax_amounts"))
        pricers = [k for k in ("amount", "unit_amount_decimal", "price_data") if k in p]
        if len(pricers) > 1:
            raise StripeError(
                f"You may only specify one of these parameters: {', '.join(pricers)}.", param=P(pricers[1])
            )
        # `amount` is the item's total: Stripe refuses it together with a quantity.
        for qk in ("quantity", "quantity_decimal"):
            if "amount" in p and qk in p:
                raise StripeError(f"You may only specify one of these parameters: amount, {qk}.", param=P(qk))
        if "quantity" in p and "quantity_decimal" in p:
            raise StripeError(
                "You may only specify one of these parameters: quantity, quantity_decimal.",
                param=P("quantity_decimal"),
            )
        if "quantity_decimal" in p:
            q = p["quantity_decimal"]
            if q < 0 or q.as_tuple().exponent < -12:
                raise StripeError(
                    "Invalid quantity_decimal: must be a non-negative decimal with at most 12 decimal places.",
                    param=P("quantity_decimal"),
                )
        elif "quantity" in p:
            if p["quantity"] < 0:
                raise StripeError("Invalid non-negative integer: quantity must be at least 0.", param=P("quantity"))
            q = Decimal(p["quantity"])
        else:
            q = cur["quantity_decimal"] if cur else Decimal(1)
        qty_changed = cur is None or q != cur["quantity_decimal"]
        unit: Decimal | None = None
        if "unit_amount_decimal" in p:
            unit = p["unit_amount_decimal"]
            if unit.as_tuple().exponent < -12:
                raise StripeError(
                    "Invalid unit_amount_decimal: at most 12 decimal places.", param=P("unit_amount_decimal")
                )
        elif "price_data" in p:
            pd = p["price_data"]
            if pd["currency"].lower() != currency:
                raise StripeError(
                    f"The price_data currency ({pd['currency']}) must match the currency ({currency}).",
                    param=P("price_data") + "[currency]",
                )
            if "unit_amount" in pd and "unit_amount_decimal" in pd:
                raise StripeError(
                    "You may only specify one of these parameters: unit_amount, unit_amount_decimal.",
                    param=P("price_data") + "[unit_amount_decimal]",
                )
            if "unit_amount" in pd:
                unit = Decimal(pd["unit_amount"])
            elif "unit_amount_decimal" in pd:
                unit = pd["unit_amount_decimal"]
            else:
                raise missing_param(P("price_data") + "[unit_amount]")
            if "product" not in pd and "product_data" not in pd:
                raise missing_param(P("price_data") + "[product]")
            ch["product"] = pd.get("product") or self.new_id("prod")
            ch["price"] = self.new_id("price")
        if "amount" in p:
            amount = p["amount"]
            q = Decimal(1)
            qty_changed = cur is None or q != cur["quantity_decimal"]
            ch["unit_amount_decimal"] = Decimal(amount)
            ch["amount"] = amount
        elif unit is not None:
            ch["unit_amount_decimal"] = unit
            ch["amount"] = round_amount(unit * q)
        elif cur is not None:
            if qty_changed:
                ch["amount"] = round_amount(cur["unit_amount_decimal"] * q)
        else:
            raise missing_param(P("amount"))
        if cur is None or qty_changed:
            ch["quantity_decimal"] = q
            ch["quantity"] = int(q) if q == q.to_integral_value() else round_amount(q)
        if cur is None and "price" not in ch:
            ch["price"] = self.new_id("price")
            ch["product"] = self.new_id("prod")
        if "description" in p:
            ch["description"] = p["description"] or None
        if "discountable" in p:
            ch["discountable"] = p["discountable"]
        elif cur is None:
            ch["discountable"] = ch["amount"] >= 0
        if "period" in p:
            per = p["period"]
            if per["end"] < per["start"]:
                raise StripeError(
                    "The period end must be greater than or equal to the period start.", param=P("period") + "[end]"
                )
            ch["period"] = {"start": per["start"], "end": per["end"]}
        if "metadata" in p:
            meta = p["metadata"]
            if meta != "":
                check_metadata(meta, P("metadata"))
            ch["metadata"] = apply_metadata(cur["metadata"] if cur else {}, meta)
        return ch

    def _new_item(self, customer: dict, currency: str, ch: dict) -> dict:
        now = self.now()
        it = {
            "id": self.new_id("ii"),
            "_seq": self._seq(),
            "customer": customer["id"],
            "currency": currency,
            "date": now,
            "description": None,
            "metadata": {},
            "period": {"start": now, "end": now},
            "invoice": None,
            "line_id": None,
        }
        it.update(ch)
        return it

    def _attach(self, it: dict, inv: dict) -> None:
        it["invoice"] = inv["id"]
        it["line_id"] = self.new_id("il")
        inv["items"].append(it["id"])
        self.lines[it["line_id"]] = it["id"]

    def _detach(self, it: dict, inv: dict) -> None:
        inv["items"].remove(it["id"])
        self.lines.pop(it["line_id"], None)
        it["invoice"] = None
        it["line_id"] = None

    def _require_draft_for_items(self, inv: dict, verb: str, param: str | None = None) -> None:
        if inv["status"] != "draft":
            raise not_editable(
                f"You can only {verb} invoice items on draft invoices: invoice {inv['id']} is "
                f"{inv['status']} and can no longer be edited.",
                param,
            )

    def _room(self, inv: dict, adding: int, param: str | None = "invoice") -> None:
        if len(inv["items"]) + adding > MAX_ITEMS_PER_INVOICE:
            raise StripeError(
                f"An invoice can have at most {MAX_ITEMS_PER_INVOICE} invoice items; invoice {inv['id']} "
                f"has {len(inv['items'])}.",
                param=param,
            )

    def create_item(self, p: dict) -> dict:
        """POST /v1/invoiceitems"""
        inv = None
        if p.get("subscription"):
            raise no_such("subscription", p["subscription"], "subscription")
        if "invoice" in p:
            inv = self._invoice(p["invoice"], "invoice")
            self._writable_customer(inv)
        if "customer" in p:
            cust = self._customer(p["customer"], "customer")
            if inv is not None and inv["customer"] != cust["id"]:
                raise StripeError(
                    f"The invoice {inv['id']} belongs to customer {inv['customer']}, not {cust['id']}.",
                    param="invoice",
                )
        elif inv is not None:
            cust = self._customer(inv["customer"], "invoice")
        else:
            raise missing_param("customer")
        currency = (p.get("currency") or (inv["currency"] if inv else cust["currency"]) or "usd").lower()
        if inv is not None:
            self._require_draft_for_items(inv, "add", "invoice")
            if currency != inv["currency"]:
                raise StripeError(
                    f"The currency of the invoice item ({currency}) must match the currency of the invoice "
                    f"({inv['currency']}).",
                    param="currency",
                )
            self._room(inv, 1)
        ch = self._item_changes(p, None, currency)
        before = self._snap(inv) if inv is not None else None
        it = self._new_item(cust, currency, ch)
        self.items[it["id"]] = it
        if cust["currency"] is None:
            cust["currency"] = currency
        if inv is not None:
            self._attach(it, inv)
        out = O.render_item(it)
        self.emit("invoiceitem.created", out)
        if inv is not None:
            self._invoice_updated(inv, before)
        return out

    def _invoice_updated(self, inv: dict, before: dict) -> None:
        after = self.r_invoice(inv)
        prev = O.diff(before, after)
        self.emit("invoice.updated", after, prev)

    def retrieve_item(self, iid: str, p: dict) -> dict:
        """GET /v1/invoiceitems/{id}"""
        return O.render_item(self._item(iid))

    def update_item(self, iid: str, p: dict) -> dict:
        """POST /v1/invoiceitems/{id}"""
        it = self._item(iid)
        self._writable_customer(it)
        inv = self.invoices.get(it["invoice"]) if it["invoice"] else None
        if inv is not None:
            self._require_draft_for_items(inv, "update")
        ch = self._item_changes(p, it, it["currency"])
        before_inv = self._snap(inv) if inv is not None else None
        before = O.render_item(it)
        it.update(ch)
        after = O.render_item(it)
        self.emit("invoiceitem.updated", after, O.diff(before, after))
        if inv is not None:
            self._invoice_updated(inv, before_inv)
        return after

    def delete_item(self, iid: str, p: dict) -> dict:
        """DELETE /v1/invoiceitems/{id}"""
        it = self._item(iid)
        self._writable_customer(it)
        inv = self.invoices.get(it["invoice"]) if it["invoice"] else None
        if inv is not None:
            self._require_draft_for_items(inv, "delete")
            before_inv = self._snap(inv)
            last = O.render_item(it)
            self._detach(it, inv)
            it["deleted"] = True
            self.emit("invoiceitem.deleted", last)
            self._invoice_updated(inv, before_inv)
        else:
            last = O.render_item(it)
            it["deleted"] = True
            self.emit("invoiceitem.deleted", last)
        return O.deleted(iid, "invoiceitem")

    def list_items(self, p: dict) -> dict:
        """GET /v1/invoiceitems (filters: customer, invoice, pending, created)"""
        cust, invf, pending, created = p.get("customer"), p.get("invoice"), p.get("pending"), p.get("created")
        if invf is not None:
            inv = self._invoice(invf, "invoice")
            recs = [self.items[i] for i in inv["items"]]
            recs = [r for r in recs if (cust is None or r["customer"] == cust) and self._created_ok(r["date"], created)]
            recs.sort(key=lambda r: -r["_seq"])
        else:
            recs = [
                r
                for r in self.items.values()
                if not r.get("deleted")
                and (cust is None or r["customer"] == cust)
                and (pending is None or (r["invoice"] is None) == pending)
                and self._created_ok(r["date"], created)
            ]
            recs.sort(key=lambda r: -r["_seq"])
        return self._paginate(recs, p, "/v1/invoiceitems", O.render_item, "invoiceitem")

    # ================================================================== invoices
    def create_invoice(self, p: dict) -> dict:
        """POST /v1/invoices"""
        if "customer" not in p:
            if p.get("customer_account"):
                raise no_such("account", p["customer_account"], "customer_account")
            raise missing_param("customer")
        cust = self._customer(p["customer"], "customer")
        for k, kind in (("subscription", "subscription"), ("from_invoice", "invoice")):
            if p.get(k):
                ref = p[k] if isinstance(p[k], str) else p[k].get("invoice", "")
                raise no_such(kind, ref, k)
        if p.get("default_tax_rates"):
            raise no_such("tax rate", p["default_tax_rates"][0], "default_tax_rates[0]")
        if p.get("discounts"):
            raise no_such("coupon", str(p["discounts"][0].get("coupon", "")), "discounts[0]")
        if p.get("automatic_tax", {}).get("enabled"):
            raise StripeError(
                "Automatic tax calculation is not available in the emulator.", param="automatic_tax[enabled]"
            )
        currency = (p.get("currency") or cust["currency"] or "usd").lower()
        now = self.now()
        inv = {
            "id": self.new_id("in"),
            "_seq": self._seq(),
            "created": now,
            "customer": cust["id"],
            "currency": currency,
            "status": "draft",
            "auto_advance": False,
            "automatically_finalizes_at": None,
            "_afa_explicit": None,  # a time asked for while auto_advance was on
            "default_payment_method": None,
            "last_finalization_error": None,
            "deferred_to_balance": 0,
            "collection_method": "charge_automatically",
            "days_until_due": None,
            "due_date": None,
            "description": None,
            "footer": None,
            "custom_fields": None,
            "statement_descriptor": None,
            "metadata": {},
            "items": [],
            "number": None,
            "hosted_invoice_url": None,
            "invoice_pdf": None,
            "status_transitions": {
                "finalized_at": None,
                "marked_uncollectible_at": None,
                "paid_at": None,
                "voided_at": None,
            },
            "amount_paid": 0,
            "attempt_count": 0,
            "attempted": False,
            "next_payment_attempt": None,
            "starting_balance": 0,
            "effective_at": None,
            "customer_snapshot": None,
            "paid_out_of_band": False,
        }
        self._invoice_fields(inv, p, creating=True)
        pending = []
        if p.get("pending_invoice_items_behavior", "exclude") == "include":
            pending = sorted(
                (
                    it
                    for it in self.items.values()
                    if it["customer"] == cust["id"]
                    and it["invoice"] is None
                    and not it.get("deleted")
                    and it["currency"] == currency
                ),
                key=lambda r: r["_seq"],
            )
            if len(pending) > MAX_ITEMS_PER_INVOICE:
                raise StripeError(
                    f"An invoice can have at most {MAX_ITEMS_PER_INVOICE} invoice items; customer "
                    f"{cust['id']} has {len(pending)} pending.",
                    param="pending_invoice_items_behavior",
                )
        if cust["currency"] is None:
            cust["currency"] = currency
        self.invoices[inv["id"]] = inv
        for it in pending:
            self._attach(it, inv)
        self._schedule(inv)
        self.emit("invoice.created", self.r_invoice(inv))
        for it in pending:
            self.emit("invoiceitem.updated", O.render_item(it), {"invoice": None})
        return self.r_invoice(inv)

    _AFTER_FINALIZATION = frozenset(
        {
            "metadata",
            "description",
            "footer",
            "auto_advance",
            "custom_fields",
            "rendering",
            "expand",
            "default_payment_method",
        }
    )

    def _invoice_fields(self, inv: dict, p: dict, creating: bool = False) -> None:
        now = self.now()
        if not creating and inv["status"] != "draft":
            bad = [k for k in p if k not in self._AFTER_FINALIZATION]
            if bad:
                raise not_editable(
                    f"You can only update `{bad[0]}` on a draft invoice: invoice {inv['id']} is {inv['status']}.",
                    bad[0],
                )
        if "collection_method" in p:
            inv["collection_method"] = p["collection_method"]
        if "days_until_due" in p:
            inv["days_until_due"] = p["days_until_due"]
        if "due_date" in p:
            inv["due_date"] = p["due_date"]
        if inv["collection_method"] == "send_invoice" and inv["days_until_due"] is None and inv["due_date"] is None:
            raise missing_param("days_until_due")
        if inv["collection_method"] == "charge_automatically" and ("days_until_due" in p or "due_date" in p):
            param = "days_until_due" if "days_until_due" in p else "due_date"
            raise StripeError(f"You can only set `{param}` when `collection_method` is `send_invoice`.", param=param)
        for k in ("description", "footer", "statement_descriptor"):
            if k in p:
                inv[k] = p[k] or None
        if "custom_fields" in p:
            inv["custom_fields"] = p["custom_fields"] or None
        if "effective_at" in p:
            inv["effective_at"] = p["effective_at"] or None
        if "number" in p:
            inv["number"] = p["number"] or None
        if "metadata" in p:
            inv["metadata"] = apply_metadata(inv["metadata"], p["metadata"])
        if p.get("default_payment_method"):
            ref = p["default_payment_method"]
            pm = self.payment_methods.get(ref)
            if pm is None:
                raise no_such("PaymentMethod", ref, "default_payment_method")
            if pm["customer"] != inv["customer"]:
                raise StripeError(
                    f"The PaymentMethod {ref} does not belong to the Customer {inv['customer']}. Please attach it "
                    "to the Customer first.",
                    param="default_payment_method",
                )
            inv["default_payment_method"] = ref
        elif p.get("default_payment_method") == "":
            inv["default_payment_method"] = None
        # A finalization time is scheduled only with auto_advance: without it the time
        # is accepted and ignored; turning auto_advance off forgets it.
        if "auto_advance" in p:
            inv["auto_advance"] = p["auto_advance"]
            if not p["auto_advance"]:
                inv["_afa_explicit"] = None
        if "automatically_finalizes_at" in p:
            t = p["automatically_finalizes_at"]
            if t <= now or t > now + FIVE_YEARS:
                raise StripeError(
                    "Invalid automatically_finalizes_at: must be in the future and at most 5 years from now.",
                    param="automatically_finalizes_at",
                )
            if inv["auto_advance"]:
                inv["_afa_explicit"] = t
        if inv["status"] == "draft" and ("auto_advance" in p or "automatically_finalizes_at" in p or creating):
            # Without a time, Stripe finalizes an auto-advancing draft about an hour after creation.
            explicit = inv["_afa_explicit"]
            inv["automatically_finalizes_at"] = (explicit or inv["created"] + 3600) if inv["auto_advance"] else None

    def _schedule(self, inv: dict) -> None:
        if inv["status"] == "draft" and inv["automatically_finalizes_at"] is not None:
            self._push_due(inv["automatically_finalizes_at"], "finalize", inv["id"])

    def retrieve_invoice(self, iid: str, p: dict) -> dict:
        """GET /v1/invoices/{id}"""
        return self.r_invoice(self._invoice(iid, "id"))

    def update_invoice(self, iid: str, p: dict) -> dict:
        """POST /v1/invoices/{id}"""
        inv = self._invoice(iid, "id")
        self._writable_customer(inv)
        before = self._snap(inv)
        saved = {k: (dict(v) if isinstance(v, dict) else v) for k, v in inv.items() if k != "items"}
        try:
            self._invoice_fields(inv, p)
        except StripeError:
            inv.update(saved)
            raise
        if "auto_advance" in p or "automatically_finalizes_at" in p:
            self._schedule(inv)
        if "auto_advance" in p:
            self._auto_advance_changed(inv)
        after = self.r_invoice(inv)
        prev = O.diff(before, after)
        if prev:
            self.emit("invoice.updated", after, prev)
        return self.r_invoice(inv)

    def delete_invoice(self, iid: str, p: dict) -> dict:
        """DELETE /v1/invoices/{id} (drafts only; their items are deleted too)"""
        inv = self._invoice(iid, "id")
        self._writable_customer(inv)
        if inv["status"] != "draft":
            raise StripeError(
                "You can only delete draft invoices. Finalized invoices can be voided instead.",
                param="id",
                code="invoice_not_editable",
            )
        last = self.r_invoice(inv)
        for it in self._inv_items(inv):
            item_last = O.render_item(it)
            self.lines.pop(it["line_id"], None)
            it["deleted"] = True
            self.emit("invoiceitem.deleted", item_last)
        inv["items"] = []
        inv["deleted"] = True
        self.emit("invoice.deleted", last)
        return O.deleted(iid, "invoice")

    def list_invoices(self, p: dict) -> dict:
        """GET /v1/invoices (filters: customer, status, collection_method, created, due_date)"""
        cust, status, cm = p.get("customer"), p.get("status"), p.get("collection_method")
        created = p.get("created")
        if p.get("subscription"):
            recs = []
        else:
            recs = [
                r
                for r in self.invoices.values()
                if not r.get("deleted")
                and (cust is None or r["customer"] == cust)
                and (status is None or r["status"] == status)
                and (cm is None or r["collection_method"] == cm)
                and self._created_ok(r["created"], created)
            ]
        recs.sort(key=lambda r: -r["_seq"])
        return self._paginate(recs, p, "/v1/invoices", self.r_invoice, "invoice")

    def list_lines(self, iid: str, p: dict) -> dict:
        """GET /v1/invoices/{id}/lines (in the invoice's order)"""
        inv = self._invoice(iid, "invoice")
        recs = [dict(self.items[i], id=self.items[i]["line_id"], _item=i) for i in inv["items"]]
        items = self.items
        return self._paginate(
            recs, p, f"/v1/invoices/{iid}/lines", lambda r: O.render_line(items[r["_item"]]), "line item"
        )

    # ------------------------------------------------------------------ lines
    def _line(self, inv: dict, line_id, param: str) -> dict:
        item_id = self.lines.get(line_id) if isinstance(line_id, str) else None
        it = self.items.get(item_id) if item_id else None
        if it is None or it["invoice"] != inv["id"]:
            raise no_such("invoice line item", str(line_id), param)
        return it

    def _bulk_prelude(self, iid: str, p: dict) -> dict:
        inv = self._invoice(iid, "invoice")
        self._writable_customer(inv)
        lines = p["lines"]
        if not lines:
            raise StripeError("You must pass at least one line.", param="lines")
        if len(lines) > self.max_bulk_lines:
            raise StripeError(
                f"You can pass at most {self.max_bulk_lines} lines per request; you passed {len(lines)}.",
                param="lines",
            )
        if inv["status"] != "draft":
            raise not_editable(
                f"You can only change the lines of a draft invoice: invoice {inv['id']} is {inv['status']}.",
                "lines",
            )
        if "invoice_metadata" in p and p["invoice_metadata"] != "":
            check_metadata(p["invoice_metadata"], "invoice_metadata")
        return inv

    def _bulk_finish(self, inv: dict, p: dict, before: dict) -> dict:
        if "invoice_metadata" in p:
            inv["metadata"] = apply_metadata(inv["metadata"], p["invoice_metadata"])
        self._invoice_updated(inv, before)
        return self.r_invoice(inv)

    def add_lines(self, iid: str, p: dict) -> dict:
        """POST /v1/invoices/{id}/add_lines: all lines or none."""
        inv = self._bulk_prelude(iid, p)
        cust = self.customers[inv["customer"]]
        self._room(inv, len(p["lines"]), "lines")
        plans = []
        seen: set[str] = set()
        for i, line in enumerate(p["lines"]):
            prefix = f"lines[{i}]"
            existing = None
            if "invoice_item" in line:
                ref = line["invoice_item"]
                existing = self.items.get(ref)
                if existing is None or existing.get("deleted"):
                    raise no_such("invoiceitem", ref, f"{prefix}[invoice_item]")
                if existing["invoice"] is not None or ref in seen:
                    raise StripeError(
                        f"The invoice item {ref} is already on an invoice.", param=f"{prefix}[invoice_item]"
                    )
                if existing["customer"] != inv["customer"] or existing["currency"] != inv["currency"]:
                    raise StripeError(
                        f"The invoice item {ref} belongs to another customer or currency.",
                        param=f"{prefix}[invoice_item]",
                    )
                seen.add(ref)
                fields = {k: v for k, v in line.items() if k != "invoice_item"}
                plans.append((existing, self._item_changes(fields, existing, inv["currency"], prefix)))
            else:
                plans.append((None, self._item_changes(line, None, inv["currency"], prefix)))
        before = self._snap(inv)
        for existing, ch in plans:
            if existing is None:
                it = self._new_item(cust, inv["currency"], ch)
                self.items[it["id"]] = it
                self._attach(it, inv)
                self.emit("invoiceitem.created", O.render_item(it))
            else:
                prev_item = O.render_item(existing)
                existing.update(ch)
                self._attach(existing, inv)
                after = O.render_item(existing)
                self.emit("invoiceitem.updated", after, O.diff(prev_item, after))
        return self._bulk_finish(inv, p, before)

    def _named_lines(self, inv: dict, lines: list[dict]):
        """(param prefix, item, line) for each line named by its il_ id; a line named
        twice is refused."""
        seen: set[str] = set()
        for i, line in enumerate(lines):
            prefix = f"lines[{i}]"
            it = self._line(inv, line["id"], f"{prefix}[id]")
            if line["id"] in seen:
                raise StripeError(f"Line {line['id']} is listed more than once.", param=f"{prefix}[id]")
            seen.add(line["id"])
            yield prefix, it, line

    def update_lines(self, iid: str, p: dict) -> dict:
        """POST /v1/invoices/{id}/update_lines: all lines or none."""
        inv = self._bulk_prelude(iid, p)
        plans = []
        for prefix, it, line in self._named_lines(inv, p["lines"]):
            fields = {k: v for k, v in line.items() if k != "id"}
            plans.append((it, self._item_changes(fields, it, inv["currency"], prefix)))
        before = self._snap(inv)
        for it, ch in plans:
            prev_item = O.render_item(it)
            it.update(ch)
            after = O.render_item(it)
            self.emit("invoiceitem.updated", after, O.diff(prev_item, after))
        return self._bulk_finish(inv, p, before)

    def remove_lines(self, iid: str, p: dict) -> dict:
        """POST /v1/invoices/{id}/remove_lines (behavior delete | unassign): all or none."""
        inv = self._bulk_prelude(iid, p)
        plans = [(it, line["behavior"]) for _, it, line in self._named_lines(inv, p["lines"])]
        before = self._snap(inv)
        for it, behavior in plans:
            prev_item = O.render_item(it)
            self._detach(it, inv)
            if behavior == "delete":
                it["deleted"] = True
                self.emit("invoiceitem.deleted", prev_item)
            else:
                after = O.render_item(it)
                self.emit("invoiceitem.updated", after, O.diff(prev_item, after))
        return self._bulk_finish(inv, p, before)

    def update_line(self, iid: str, line_id: str, p: dict) -> dict:
        """POST /v1/invoices/{id}/lines/{line_id}: updates the line's invoice item."""
        inv = self._invoice(iid, "invoice")
        self._writable_customer(inv)
        it = self._line(inv, line_id, "line_item_id")
        if inv["status"] != "draft":
            raise not_editable(
                f"You can only update the lines of a draft invoice: invoice {inv['id']} is {inv['status']}."
            )
        ch = self._item_changes(p, it, inv["currency"])
        before = self._snap(inv)
        prev_item = O.render_item(it)
        it.update(ch)
        after = O.render_item(it)
        self.emit("invoiceitem.updated", after, O.diff(prev_item, after))
        self._invoice_updated(inv, before)
        return O.render_line(it)

    # ================================================================== clock-driven
    def has_due(self, now: int) -> bool:
        """Cheap check: is a scheduled finalization or payment attempt due?"""
        due = self._due
        return bool(due) and due[0][0] <= now

    def run_due(self) -> dict:
        """Run the finalizations and payment attempts whose time has come, in time
        order, each at its own scheduled time (so one big clock jump runs a whole
        finalize → attempt → retries sequence). Returns how many of each ran."""
        done = {"finalized": 0, "payment_attempts": 0}
        now = self.clock.now()
        saved_ctx = self.request_ctx
        self.request_ctx = (None, None)
        try:
            while self._due and self._due[0][0] <= now:
                t, _, kind, iid = heapq.heappop(self._due)
                inv = self.invoices.get(iid)
                if inv is None or inv.get("deleted"):
                    continue
                self._pinned = t
                if kind == "finalize":
                    if inv["status"] == "draft" and inv["auto_advance"] and inv["automatically_finalizes_at"] == t:
                        self._scheduled_finalize(inv)
                        done["finalized"] += inv["status"] != "draft"
                elif inv["status"] == "open" and inv["next_payment_attempt"] == t and self._auto_collects(inv):
                    self._attempt_payment(inv, manual=False)
                    done["payment_attempts"] += 1
                self._pinned = None
        finally:
            self._pinned = None
            self.request_ctx = saved_ctx
        return done

    # ================================================================== events
    def retrieve_event(self, eid: str, p: dict) -> dict:
        """GET /v1/events/{id}"""
        ev = self.events_by_id.get(eid)
        if ev is None:
            raise no_such("event", eid, "id")
        return self.public_event(ev)

    def list_events(self, p: dict) -> dict:
        """GET /v1/events (filters: type with ``*`` wildcard, types[], created)"""
        t, types, created = p.get("type"), p.get("types"), p.get("created")
        if t is not None and types is not None:
            raise StripeError("You may only specify one of these parameters: type, types.", param="types")
        if t is not None and "*" in t:
            prefix = t.split("*", 1)[0]

            def match(e):
                return e["type"].startswith(prefix)
        elif t is not None:

            def match(e):
                return e["type"] == t
        elif types is not None:
            ts = set(types)

            def match(e):
                return e["type"] in ts
        else:

            def match(e):
                return True

        recs = [e for e in reversed(self.events) if match(e) and self._created_ok(e["created"], created)]
        return self._paginate(recs, p, "/v1/events", self.public_event, "event")
