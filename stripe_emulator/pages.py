"""The emulator's own pages: hosted invoice page, invoice PDF, billing-portal page.

Finalization gives an invoice ``hosted_invoice_url = <base>/i/<id>`` and
``invoice_pdf = <base>/i/<id>/pdf``; a billing-portal session's ``url`` is
``<base>/p/session/<id>``, whose forms post to ``/p/session/<id>/payment_method``.
These functions render them from rendered Stripe objects.
"""

from __future__ import annotations

import html


def _money(amount: int, currency: str) -> str:
    sign = "-" if amount < 0 else ""
    return f"{sign}{abs(amount) / 100:,.2f} {currency.upper()}"


def invoice_html(inv: dict, lines: list[dict]) -> str:
    """A small hosted-invoice page."""
    rows = "".join(
        f"<tr><td>{html.escape(line['description'] or '')}</td><td>{line['quantity']}</td>"
        f"<td style='text-align:right'>{_money(line['amount'], line['currency'])}</td></tr>"
        for line in lines
    )
    name = html.escape(inv.get("customer_name") or inv.get("customer_email") or inv["customer"])
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>Invoice {html.escape(inv['number'] or inv['id'])}</title></head><body>"
        f"<h1>Invoice {html.escape(inv['number'] or inv['id'])}</h1>"
        f"<p>Billed to: {name}</p><p>Status: {inv['status']}</p>"
        f"<table><tr><th>Description</th><th>Qty</th><th>Amount</th></tr>{rows}</table>"
        f"<p><strong>Total: {_money(inv['total'], inv['currency'])}</strong></p>"
        f"<p>Amount due: {_money(inv['amount_due'], inv['currency'])}</p>"
        f"<p><a href='{html.escape(inv['invoice_pdf'] or '')}'>Download PDF</a></p>"
        "<p><small>Stripe emulator (test mode)</small></p></body></html>"
    )


def _pdf_escape(s: str) -> str:
    s = s.encode("latin-1", "replace").decode("latin-1")
    return s.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def invoice_pdf(inv: dict, lines: list[dict]) -> bytes:
    """A minimal, valid one-page PDF listing the invoice."""
    text = [
        f"Invoice {inv['number'] or inv['id']}",
        f"Customer: {inv.get('customer_name') or inv.get('customer_email') or inv['customer']}",
        f"Status: {inv['status']}",
        "",
    ]
    for line in lines[:40]:
        desc = (line["description"] or "")[:60]
        text.append(f"{desc}  x{line['quantity']}  {_money(line['amount'], line['currency'])}")
    text += [
        "",
        f"Total: {_money(inv['total'], inv['currency'])}",
        f"Amount due: {_money(inv['amount_due'], inv['currency'])}",
    ]
    ops = ["BT", "/F1 11 Tf", "50 800 Td", "14 TL"]
    for t in text:
        ops.append(f"({_pdf_escape(t)}) Tj T*")
    ops.append("ET")
    stream = "\n".join(ops).encode("latin-1")
    objs = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length " + str(len(stream)).encode() + b" >>\nstream\n" + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n".encode()
    out += b"0000000000 65535 f \n"
    for off in offsets:
        out += f"{off:010d} 00000 n \n".encode()
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def portal_html(session: dict, customer: dict, card: dict | None = None, error: str | None = None) -> str:
    """The billing-portal page a session's ``url`` shows: the customer, its default
    card, forms to add a test card as the default payment method (plain HTML forms,
    no script), and the link back to ``return_url``."""
    from .portal import PORTAL_CARDS

    cid = html.escape(customer["id"])
    if customer.get("deleted"):
        return (
            "<!doctype html><html><head><meta charset='utf-8'><title>Billing portal</title></head><body>"
            f"<h1>Billing portal</h1><p>Customer {cid} was deleted.</p></body></html>"
        )
    who = html.escape(customer.get("name") or customer.get("email") or customer["id"])
    ret = session.get("return_url")
    back = f"<p><a id='return' href='{html.escape(ret)}'>Return to {html.escape(ret)}</a></p>" if ret else ""
    if card is not None:
        brand = (card.get("card") or {}).get("brand") or card.get("brand") or "card"
        last4 = (card.get("card") or {}).get("last4") or card.get("last4")
        current = f"<p id='default-card'>Default card: {html.escape(brand.title())} •••• {html.escape(last4)}</p>"
    else:
        current = "<p id='default-card'>No default payment method.</p>"
    problem = f"<p id='error' role='alert'>{html.escape(error)}</p>" if error else ""
    action = html.escape(f"/p/session/{session['id']}/payment_method")
    forms = "".join(
        f"<form method='post' action='{action}'>"
        f"<input type='hidden' name='payment_method' value='{html.escape(token)}'>"
        f"<button type='submit'>{html.escape(label)}</button></form>"
        for token, label in PORTAL_CARDS
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Billing portal</title></head><body>"
        f"<h1>Billing portal</h1><p>Customer: {who} ({cid})</p>"
        f"<p>Email: {html.escape(customer.get('email') or '-')}</p>"
        f"<h2>Payment method</h2>{problem}{current}{forms}{back}"
        "<p><small>Stripe emulator (test mode).</small></p>"
        "</body></html>"
    )
