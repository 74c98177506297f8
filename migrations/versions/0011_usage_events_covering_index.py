"""usage events: the organization/time index covers what the billing page sums

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-26 15:00:00.000000

The billing page's daily-spend chart and the projection sum an organization's usage
over a span of time (product, invoice and quantity per event). On PostgreSQL the
(organization_id, occurred_at) index now carries those columns (INCLUDE), so the
sums are index-only scans instead of one heap fetch per event. SQLite has no
INCLUDE: nothing changes there.
"""
from alembic import op


# revision identifiers, used by Alembic.
revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade():
    if op.get_bind().dialect.name != 'postgresql':
        return
    op.drop_index('ix_usage_events_org_occurred', table_name='usage_events')
    op.create_index('ix_usage_events_org_occurred', 'usage_events', ['organization_id', 'occurred_at'],
                    postgresql_include=['product_id', 'invoice_id', 'quantity'])


def downgrade():
    if op.get_bind().dialect.name != 'postgresql':
        return
    op.drop_index('ix_usage_events_org_occurred', table_name='usage_events')
    op.create_index('ix_usage_events_org_occurred', 'usage_events', ['organization_id', 'occurred_at'])
