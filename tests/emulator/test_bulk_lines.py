"""add_lines / update_lines / remove_lines and single line update."""

import pytest
import stripe
from emulator_helpers import make_client


def _lines(inv):
    return {line.metadata["portal_item"]: line for line in inv.lines.data if "portal_item" in line.metadata}


def test_add_update_remove_lines_with_metadata_roundtrip(client, customer, draft):
    inv = client.v1.invoices.add_lines(
        draft.id,
        {
            "lines": [
                {"amount": 1000, "description": "Seats", "metadata": {"portal_item": "1"}},
                {
                    "amount": 250,
                    "description": "Storage",
                    "metadata": {"portal_item": "2"},
                    "period": {"start": 1_700_000_000, "end": 1_700_086_400},
                },
                {
                    "price_data": {"currency": "usd", "product": "prod_x", "unit_amount_decimal": "0.5"},
                    "quantity": 7,
                    "metadata": {"portal_item": "3"},
                },
            ],
            "invoice_metadata": {"portal_invoice": "9"},
        },
    )
    assert inv.object == "invoice" and inv.total == 1000 + 250 + 4 and inv.metadata["portal_invoice"] == "9"
    by = _lines(inv)
    assert set(by) == {"1", "2", "3"} and by["2"].period.start == 1_700_000_000
    for key, line in by.items():
        assert line.id.startswith("il_")
        item = client.v1.invoice_items.retrieve(line.parent.invoice_item_details.invoice_item)
        assert item.metadata["portal_item"] == key and item.invoice == draft.id and item.amount == line.amount

    inv = client.v1.invoices.update_lines(
        draft.id,
        {
            "lines": [
                {"id": by["1"].id, "amount": 2000, "metadata": {"portal_item": "1", "v": "2"}},
                {"id": by["3"].id, "quantity": 10},
            ]
        },
    )
    by2 = _lines(inv)
    assert by2["1"].amount == 2000 and by2["1"].metadata["v"] == "2" and by2["1"].id == by["1"].id
    assert by2["3"].amount == 5 and inv.total == 2000 + 250 + 5

    item2 = by["2"].parent.invoice_item_details.invoice_item
    item3 = by["3"].parent.invoice_item_details.invoice_item
    inv = client.v1.invoices.remove_lines(
        draft.id,
        {"lines": [{"id": by["2"].id, "behavior": "unassign"}, {"id": by["3"].id, "behavior": "delete"}]},
    )
    assert set(_lines(inv)) == {"1"} and inv.total == 2000
    assert client.v1.invoice_items.retrieve(item2).invoice is None  # pending again
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.invoice_items.retrieve(item3)

    # re-attach the unassigned item by id
    inv = client.v1.invoices.add_lines(draft.id, {"lines": [{"invoice_item": item2}]})
    assert set(_lines(inv)) == {"1", "2"} and inv.total == 2250


def test_single_line_update(client, customer, draft):
    item = client.v1.invoice_items.create(
        {"customer": customer.id, "invoice": draft.id, "amount": 100, "metadata": {"portal_item": "5"}}
    )
    line = client.v1.invoices.retrieve(draft.id).lines.data[0]
    upd = client.v1.invoices.line_items.update(
        draft.id, line.id, {"amount": 300, "description": "new", "metadata": {"extra": "y"}}
    )
    assert upd.object == "line_item" and upd.id == line.id and upd.amount == 300
    assert upd.metadata.to_dict() == {"portal_item": "5", "extra": "y"}
    it = client.v1.invoice_items.retrieve(item.id)
    assert it.amount == 300 and it.description == "new" and it.metadata["extra"] == "y"
    assert client.v1.invoices.retrieve(draft.id).total == 300
    with pytest.raises(stripe.InvalidRequestError) as ei:
        client.v1.invoices.line_items.update(draft.id, "il_missing", {"amount": 1})
    assert ei.value.http_status == 404


def test_bulk_is_all_or_nothing(client, customer, draft):
    inv = client.v1.invoices.add_lines(draft.id, {"lines": [{"amount": 100}, {"amount": 200}]})
    ids = [line.id for line in inv.lines.data]
    events_before = len(client.v1.events.list({"limit": 100}).data)
    bad_calls = [
        # second line invalid: negative quantity
        lambda: client.v1.invoices.add_lines(draft.id, {"lines": [{"amount": 5}, {"amount": 5, "quantity": -2}]}),
        # second line has no amount at all
        lambda: client.v1.invoices.add_lines(draft.id, {"lines": [{"amount": 5}, {"description": "x"}]}),
        # unknown line id in the middle
        lambda: client.v1.invoices.update_lines(
            draft.id, {"lines": [{"id": ids[0], "amount": 1}, {"id": "il_nope", "amount": 1}]}
        ),
        lambda: client.v1.invoices.remove_lines(
            draft.id, {"lines": [{"id": ids[0], "behavior": "delete"}, {"id": "il_nope", "behavior": "delete"}]}
        ),
        # bad behavior value
        lambda: client.v1.invoices.remove_lines(draft.id, {"lines": [{"id": ids[0], "behavior": "explode"}]}),
        # unknown nested parameter
        lambda: client.v1.invoices.add_lines(draft.id, {"lines": [{"amount": 5}, {"amount": 5, "foo": "x"}]}),
    ]
    for call in bad_calls:
        with pytest.raises(stripe.InvalidRequestError):
            call()
    after = client.v1.invoices.retrieve(draft.id)
    assert [line.id for line in after.lines.data] == ids and after.total == 300
    assert [line.amount for line in after.lines.data] == [100, 200]
    assert len(client.v1.events.list({"limit": 100}).data) == events_before


def test_bulk_calls_are_bounded(client, draft, ctl):
    with pytest.raises(stripe.InvalidRequestError) as ei:
        client.v1.invoices.add_lines(draft.id, {"lines": [{"amount": 1} for _ in range(51)]})
    assert ei.value.param == "lines" and "50" in ei.value.user_message
    assert client.v1.invoices.retrieve(draft.id).total == 0
    inv = client.v1.invoices.add_lines(draft.id, {"lines": [{"amount": 1} for _ in range(50)]})
    assert inv.total == 50
    ctl.set_max_bulk_lines(5)
    try:
        with pytest.raises(stripe.InvalidRequestError):
            client.v1.invoices.add_lines(draft.id, {"lines": [{"amount": 1} for _ in range(6)]})
    finally:
        ctl.set_max_bulk_lines(50)


def test_cli_max_bulk_lines_flag():
    from stripe_emulator.process import start_emulator

    with start_emulator(extra_args=["--max-bulk-lines", "3"]) as emu:
        c = make_client(emu)
        cus = c.v1.customers.create({})
        inv = c.v1.invoices.create({"customer": cus.id})
        with pytest.raises(stripe.InvalidRequestError):
            c.v1.invoices.add_lines(inv.id, {"lines": [{"amount": 1}] * 4})
        assert c.v1.invoices.add_lines(inv.id, {"lines": [{"amount": 1}] * 3}).total == 3
