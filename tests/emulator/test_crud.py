"""CRUD, lists, pagination and expand, through the real stripe library."""

import pytest
import stripe


def test_customer_crud(client):
    c = client.v1.customers.create(
        {"name": "Acme", "email": "a@acme.test", "metadata": {"org": "acme"}, "address": {"country": "FR"}}
    )
    assert c.id.startswith("cus_") and c.object == "customer"
    assert c.metadata["org"] == "acme" and c.address.country == "FR"
    got = client.v1.customers.retrieve(c.id)
    assert got.email == "a@acme.test"
    upd = client.v1.customers.update(c.id, {"name": "Acme 2", "metadata": {"org": "", "k": "v"}})
    assert upd.name == "Acme 2" and upd.metadata.to_dict() == {"k": "v"}
    gone = client.v1.customers.delete(c.id)
    assert gone.deleted is True and gone.id == c.id
    assert client.v1.customers.retrieve(c.id).deleted is True
    with pytest.raises(stripe.InvalidRequestError) as ei:
        client.v1.customers.update(c.id, {"name": "x"})
    assert ei.value.http_status == 404 and ei.value.code == "resource_missing"


def test_retrieve_missing_is_404(client):
    for call in (
        lambda: client.v1.customers.retrieve("cus_nope"),
        lambda: client.v1.invoices.retrieve("in_nope"),
        lambda: client.v1.invoice_items.retrieve("ii_nope"),
        lambda: client.v1.events.retrieve("evt_nope"),
    ):
        with pytest.raises(stripe.InvalidRequestError) as ei:
            call()
        assert ei.value.http_status == 404
        assert ei.value.error.type == "invalid_request_error"
        assert "No such" in ei.value.user_message


def test_pagination(client):
    ids = [client.v1.customers.create({"name": f"c{i}"}).id for i in range(7)]
    page1 = client.v1.customers.list({"limit": 3})
    assert page1.object == "list" and page1.url == "/v1/customers"
    assert [c.id for c in page1.data] == ids[::-1][:3] and page1.has_more is True
    page2 = client.v1.customers.list({"limit": 3, "starting_after": page1.data[-1].id})
    assert [c.id for c in page2.data] == ids[::-1][3:6] and page2.has_more is True
    page3 = client.v1.customers.list({"limit": 3, "starting_after": page2.data[-1].id})
    assert [c.id for c in page3.data] == ids[:1] and page3.has_more is False
    back = client.v1.customers.list({"limit": 2, "ending_before": page2.data[0].id})
    assert [c.id for c in back.data] == ids[::-1][1:3]
    # auto-pagination of the library walks all pages
    assert [c.id for c in client.v1.customers.list({"limit": 2}).auto_paging_iter()] == ids[::-1]
    with pytest.raises(stripe.InvalidRequestError) as ei:
        client.v1.customers.list({"limit": 101})
    assert ei.value.param == "limit"


def test_invoice_crud_and_list_filters(client, customer):
    other = client.v1.customers.create({"name": "Other"})
    a = client.v1.invoices.create({"customer": customer.id, "description": "first"})
    b = client.v1.invoices.create({"customer": customer.id})
    c = client.v1.invoices.create({"customer": other.id})
    assert a.id.startswith("in_") and a.status == "draft" and a.auto_advance is False
    assert client.v1.invoices.retrieve(a.id).description == "first"
    upd = client.v1.invoices.update(a.id, {"metadata": {"portal_invoice": "42"}, "description": "changed"})
    assert upd.metadata["portal_invoice"] == "42" and upd.description == "changed"
    mine = client.v1.invoices.list({"customer": customer.id})
    assert [i.id for i in mine.data] == [b.id, a.id]
    client.v1.invoice_items.create({"customer": customer.id, "invoice": b.id, "amount": 100})
    client.v1.invoices.finalize_invoice(b.id)
    assert [i.id for i in client.v1.invoices.list({"status": "open"}).data] == [b.id]
    assert {i.id for i in client.v1.invoices.list({"status": "draft"}).data} == {a.id, c.id}
    deleted = client.v1.invoices.delete(a.id)
    assert deleted.deleted is True
    with pytest.raises(stripe.InvalidRequestError) as ei:
        client.v1.invoices.retrieve(a.id)
    assert ei.value.http_status == 404
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.invoices.delete(b.id)  # only drafts can be deleted


def test_invoice_items_crud_and_lists(client, customer, draft):
    pending = client.v1.invoice_items.create({"customer": customer.id, "amount": 500, "currency": "usd"})
    on_inv = client.v1.invoice_items.create({"customer": customer.id, "invoice": draft.id, "amount": 250})
    assert pending.id.startswith("ii_") and pending.invoice is None
    assert on_inv.invoice == draft.id and on_inv.customer == customer.id
    upd = client.v1.invoice_items.update(on_inv.id, {"amount": 300, "description": "d", "metadata": {"x": "1"}})
    assert upd.amount == 300 and upd.description == "d" and upd.metadata["x"] == "1"
    assert [i.id for i in client.v1.invoice_items.list({"invoice": draft.id}).data] == [on_inv.id]
    assert [i.id for i in client.v1.invoice_items.list({"pending": True}).data] == [pending.id]
    assert [i.id for i in client.v1.invoice_items.list({"pending": False}).data] == [on_inv.id]
    assert len(client.v1.invoice_items.list({"customer": customer.id}).data) == 2
    assert client.v1.invoice_items.delete(on_inv.id).deleted is True
    assert client.v1.invoices.retrieve(draft.id).total == 0
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.invoice_items.retrieve(on_inv.id)


def test_expand(client, customer, draft):
    it = client.v1.invoice_items.create(
        {"customer": customer.id, "invoice": draft.id, "amount": 100, "expand": ["customer", "invoice"]}
    )
    assert it.customer.id == customer.id and it.customer.object == "customer"
    assert it.invoice.object == "invoice" and it.invoice.total == 100
    inv = client.v1.invoices.retrieve(draft.id, {"expand": ["customer"]})
    assert inv.customer.name == "Acme Ltd"
    lst = client.v1.invoices.list({"expand": ["data.customer"]})
    assert lst.data[0].customer.id == customer.id
    with pytest.raises(stripe.InvalidRequestError) as ei:
        client.v1.invoices.retrieve(draft.id, {"expand": ["total"]})
    assert "cannot be expanded" in ei.value.user_message


def test_invoice_lines_list_and_paging(client, customer, draft):
    items = [
        client.v1.invoice_items.create({"customer": customer.id, "invoice": draft.id, "amount": i + 1})
        for i in range(12)
    ]
    inv = client.v1.invoices.retrieve(draft.id)
    assert len(inv.lines.data) == 10 and inv.lines.has_more is True
    assert inv.lines.url == f"/v1/invoices/{draft.id}/lines"
    all_lines = list(client.v1.invoices.line_items.list(draft.id, {"limit": 5}).auto_paging_iter())
    assert [line.parent.invoice_item_details.invoice_item for line in all_lines] == [i.id for i in items]
    assert all(line.id.startswith("il_") and line.invoice == draft.id for line in all_lines)
    assert inv.total == sum(range(1, 13))


# Stripe docs: "Create a portal session" (https://docs.stripe.com/api/customer_portal/sessions/create).
def test_billing_portal_session_and_page(client, customer, emulator, ctl):
    import urllib.request

    ctl.set_portal_default_configuration(True)
    s = client.v1.billing_portal.sessions.create({"customer": customer.id, "return_url": "https://portal.test/billing"})
    assert s.id.startswith("bps_") and s.customer == customer.id and s.return_url == "https://portal.test/billing"
    assert s.url.startswith(emulator.url)
    page = urllib.request.urlopen(s.url).read().decode()
    assert customer.id in page and "Acme Ltd" in page and 'href="https://portal.test/billing"' not in page
    assert "href='https://portal.test/billing'" in page
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.billing_portal.sessions.create({"customer": "cus_missing"})


def test_request_log_and_reset(client, customer, ctl, emulator):
    client.v1.invoices.create({"customer": customer.id, "metadata": {"k": "v"}}, {"idempotency_key": "inv-1"})
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.invoices.retrieve("in_missing")
    log = ctl.requests_log()
    assert [(r["method"], r["path"], r["status"]) for r in log] == [
        ("POST", "/v1/customers", 200),
        ("POST", "/v1/invoices", 200),
        ("GET", "/v1/invoices/in_missing", 404),
    ]
    row = log[1]
    assert row["params"] == {"customer": customer.id, "metadata": {"k": "v"}} and row["idempotency_key"] == "inv-1"
    assert row["time"] > 1_600_000_000 and row["api_key"].startswith("sha256:")
    assert emulator.api_key not in str(log)  # only a fingerprint of the key
    assert [r["path"] for r in ctl.requests_log(since=2)] == ["/v1/invoices/in_missing"]
    ctl.set_faults(rules=[{"kind": "latency", "latency_ms": 1}])
    ctl.advance_clock(100)
    ctl.reset()
    assert ctl.requests_log() == [] and ctl.faults()["rules"] == []
    assert abs(ctl.now() - __import__("time").time()) < 5  # clock back to wall time
    assert client.v1.customers.list().data == [] and client.v1.events.list().data == []
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.customers.retrieve(customer.id)
    # idempotency keys are forgotten too: the same key with other params is fine
    other = client.v1.customers.create({"name": "n"})
    inv = client.v1.invoices.create({"customer": other.id}, {"idempotency_key": "inv-1"})
    assert inv.customer == other.id


def test_deleting_a_draft_emits_invoice_deleted(client, customer, draft):
    item = client.v1.invoice_items.create({"customer": customer.id, "invoice": draft.id, "amount": 5})
    client.v1.invoices.delete(draft.id)
    types = [e.type for e in client.v1.events.list({"limit": 3}).data]
    assert types[:2] == ["invoice.deleted", "invoiceitem.deleted"]
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.invoice_items.retrieve(item.id)
