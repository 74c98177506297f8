"""drift: the last comparison of each open invoice with its Stripe draft

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-26 14:37:56.596098

`drift_checks` keeps, per invoice, what the latest comparison with the Stripe draft
found (lines missing, extra or different at Stripe, lines added there by hand, a
draft or customer deleted at Stripe), from support's "Compare with Stripe" or the
periodic drift sweep. `drift_sweep_cursor` is the one row the sweep goes on from.
"""
from alembic import op
import sqlalchemy as sa

import portal.models.types


# revision identifiers, used by Alembic.
revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        'drift_sweep_cursor',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('last_invoice_id', sa.BigInteger(), nullable=False),
        sa.Column('updated_at', portal.models.types.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_drift_sweep_cursor')),
    )
    op.create_table(
        'drift_checks',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
        sa.Column('invoice_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
        sa.Column('checked_at', portal.models.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column('source', sa.String(length=16), nullable=False),
        sa.Column('outcome', sa.String(length=24), nullable=False),
        sa.Column('stripe_invoice_id', sa.String(length=255), nullable=True),
        sa.Column('missing', sa.Integer(), nullable=False),
        sa.Column('extra', sa.Integer(), nullable=False),
        sa.Column('different', sa.Integer(), nullable=False),
        sa.Column('by_hand', sa.Integer(), nullable=False),
        sa.Column('portal_total_cents', sa.BigInteger(), nullable=True),
        sa.Column('stripe_total_cents', sa.BigInteger(), nullable=True),
        sa.Column('details', sa.JSON(), nullable=False),
        sa.Column('error', sa.Text(), nullable=True),
        sa.CheckConstraint("outcome IN ('clean', 'drift', 'draft_missing', 'customer_missing', 'not_draft', 'error')",
                           name=op.f('ck_drift_checks_outcome_known')),
        sa.CheckConstraint("source IN ('sweep', 'compare')", name=op.f('ck_drift_checks_source_known')),
        sa.ForeignKeyConstraint(['invoice_id'], ['invoices.id'], name=op.f('fk_drift_checks_invoice_id_invoices'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_drift_checks')),
        sa.UniqueConstraint('invoice_id', name=op.f('uq_drift_checks_invoice_id')),
    )
    with op.batch_alter_table('drift_checks') as batch_op:
        batch_op.create_index('ix_drift_checks_outcome_checked', ['outcome', 'checked_at'], unique=False)


def downgrade():
    with op.batch_alter_table('drift_checks') as batch_op:
        batch_op.drop_index('ix_drift_checks_outcome_checked')
    op.drop_table('drift_checks')
    op.drop_table('drift_sweep_cursor')
