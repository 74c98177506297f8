"""payments, balance and payment methods as Stripe reports them

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 12:00:00.000000

Stripe collects a finalized invoice on its own schedule, and may fail to: the
portal keeps what Stripe last said about each invoice's collection (attempts, next
attempt, a problem that needs the customer, the amount due and paid, a failed
scheduled finalization), and about each organization's Stripe customer (its default
payment method and its balance). A sync run may carry a note for support (a Stripe
object recreated after it disappeared).
"""
from alembic import op
import sqlalchemy as sa

import portal.models.types


# revision identifiers, used by Alembic.
revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('invoices') as batch_op:
        batch_op.add_column(sa.Column('amount_due_cents', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('amount_paid_cents', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('carried_to_balance_cents', sa.BigInteger(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('payment_attempts', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('next_payment_attempt_at', portal.models.types.UTCDateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('payment_problem', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('finalization_error', sa.Text(), nullable=True))
    with op.batch_alter_table('organizations') as batch_op:
        batch_op.add_column(sa.Column('payment_method', sa.String(length=120), nullable=True))
        batch_op.add_column(sa.Column('stripe_balance_cents', sa.BigInteger(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('stripe_customer_seen_at', sa.BigInteger(), nullable=True))
    with op.batch_alter_table('sync_runs') as batch_op:
        batch_op.add_column(sa.Column('note', sa.Text(), nullable=True))


def downgrade():
    with op.batch_alter_table('sync_runs') as batch_op:
        batch_op.drop_column('note')
    with op.batch_alter_table('organizations') as batch_op:
        batch_op.drop_column('stripe_customer_seen_at')
        batch_op.drop_column('stripe_balance_cents')
        batch_op.drop_column('payment_method')
    with op.batch_alter_table('invoices') as batch_op:
        batch_op.drop_column('finalization_error')
        batch_op.drop_column('payment_problem')
        batch_op.drop_column('next_payment_attempt_at')
        batch_op.drop_column('payment_attempts')
        batch_op.drop_column('carried_to_balance_cents')
        batch_op.drop_column('amount_paid_cents')
        batch_op.drop_column('amount_due_cents')
