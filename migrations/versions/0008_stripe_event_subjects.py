"""Stripe events name their organization and invoice in indexed columns

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-26 15:00:00.000000

Support found an organization's events by searching the JSON payload of every stored
event (seconds with a few hundred thousand events). Each event now carries
`organization_id` and `invoice_id`, indexed with `received_at`. Existing rows are
filled from their payload here, in batches of BATCH rows read and written from
Python, so the same code runs on SQLite and PostgreSQL and no statement holds the
whole table. The lookup is frozen in this file (the models may change later).
"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

BATCH = 2000

events = sa.table(
    'stripe_events',
    sa.column('id', sa.BigInteger), sa.column('payload', sa.JSON),
    sa.column('organization_id', sa.BigInteger), sa.column('invoice_id', sa.BigInteger),
)
organizations = sa.table('organizations', sa.column('id', sa.BigInteger), sa.column('stripe_customer_id', sa.String))
invoices = sa.table('invoices', sa.column('id', sa.BigInteger), sa.column('organization_id', sa.BigInteger),
                    sa.column('stripe_invoice_id', sa.String))


def upgrade():
    with op.batch_alter_table('stripe_events') as batch_op:
        batch_op.add_column(sa.Column('organization_id', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('invoice_id', sa.BigInteger(), nullable=True))
    backfill(op.get_bind())
    # Indexed once filled: cheaper than keeping two indexes up to date row by row.
    with op.batch_alter_table('stripe_events') as batch_op:
        batch_op.create_index('ix_stripe_events_organization_received', ['organization_id', 'received_at'])
        batch_op.create_index('ix_stripe_events_invoice_received', ['invoice_id', 'received_at'])


def downgrade():
    with op.batch_alter_table('stripe_events') as batch_op:
        batch_op.drop_index('ix_stripe_events_invoice_received')
        batch_op.drop_index('ix_stripe_events_organization_received')
        batch_op.drop_column('invoice_id')
        batch_op.drop_column('organization_id')


def backfill(connection) -> int:
    """Fill the two columns of every stored event from its payload; returns the rows filled."""
    filled, last_id = 0, 0
    update = (sa.update(events).where(events.c.id == sa.bindparam('row_id'))
              .values(organization_id=sa.bindparam('org'), invoice_id=sa.bindparam('inv')))
    while True:
        rows = connection.execute(
            sa.select(events.c.id, events.c.payload).where(events.c.id > last_id).order_by(events.c.id).limit(BATCH)
        ).all()
        if not rows:
            return filled
        last_id = rows[-1].id
        refs = {row.id: _references(row.payload) for row in rows}
        by_stripe_invoice, by_invoice_id = _invoices(connection, refs.values())
        by_customer, known_organizations = _organizations(connection, refs.values())
        values = []
        for row_id, ref in refs.items():
            invoice = by_stripe_invoice.get(ref['invoice']) or by_invoice_id.get(ref['invoice_id'])
            if invoice is not None:
                organization_id, invoice_id = invoice[1], invoice[0]
            else:
                invoice_id = None
                organization_id = by_customer.get(ref['customer'])
                if organization_id is None and ref['organization'] in known_organizations:
                    organization_id = ref['organization']
            if organization_id is not None or invoice_id is not None:
                values.append({'row_id': row_id, 'org': organization_id, 'inv': invoice_id})
        if values:
            connection.execute(update, values)
            filled += len(values)


def _invoices(connection, refs):
    stripe_ids = {ref['invoice'] for ref in refs if ref['invoice']}
    portal_ids = {ref['invoice_id'] for ref in refs if ref['invoice_id'] is not None}
    by_stripe, by_id = {}, {}
    if stripe_ids:
        for row in connection.execute(sa.select(invoices.c.id, invoices.c.organization_id, invoices.c.stripe_invoice_id)
                                      .where(invoices.c.stripe_invoice_id.in_(stripe_ids))):
            by_stripe[row.stripe_invoice_id] = (row.id, row.organization_id)
    if portal_ids:
        for row in connection.execute(sa.select(invoices.c.id, invoices.c.organization_id)
                                      .where(invoices.c.id.in_(portal_ids))):
            by_id[row.id] = (row.id, row.organization_id)
    return by_stripe, by_id


def _organizations(connection, refs):
    customers = {ref['customer'] for ref in refs if ref['customer']}
    portal_ids = {ref['organization'] for ref in refs if ref['organization'] is not None}
    by_customer, known = {}, set()
    if customers:
        for row in connection.execute(sa.select(organizations.c.id, organizations.c.stripe_customer_id)
                                      .where(organizations.c.stripe_customer_id.in_(customers))):
            by_customer[row.stripe_customer_id] = row.id
    if portal_ids:
        known = set(connection.scalars(sa.select(organizations.c.id).where(organizations.c.id.in_(portal_ids))))
    return by_customer, known


def _digits(value):
    return int(value) if isinstance(value, str) and value.isdigit() and len(value) < 19 else None


def _stripe_id(value):
    if isinstance(value, dict):
        value = value.get('id')
    return value if isinstance(value, str) and value else None


def _references(payload):
    data = payload.get('data') if isinstance(payload, dict) else None
    obj = data.get('object') if isinstance(data, dict) else None
    if not isinstance(obj, dict):
        return {'customer': None, 'invoice': None, 'organization': None, 'invoice_id': None}
    kind = obj.get('object')
    metadata = obj.get('metadata') if isinstance(obj.get('metadata'), dict) else {}
    return {
        'customer': _stripe_id(obj.get('id') if kind == 'customer' else obj.get('customer')),
        'invoice': _stripe_id(obj.get('id') if kind == 'invoice' else obj.get('invoice')),
        'organization': _digits(metadata.get('portal_organization_id')),
        'invoice_id': _digits(metadata.get('portal_invoice_id') or metadata.get('portal_invoice')),
    }
