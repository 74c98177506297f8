"""one idempotency key per attempt of a Stripe write

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26 12:30:00.000000

Every write to Stripe gets a key of its own, recorded before the call (what, for
which invoice or organization, when) and its outcome after: a write needed again is
a new attempt with a new key, so Stripe can never answer it with the stored response
of an earlier one. The per-invoice key salt, which only moved after a 500, goes.
"""
from alembic import op
import sqlalchemy as sa

import portal.models.types


# revision identifiers, used by Alembic.
revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        'stripe_writes',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
        sa.Column('idempotency_key', sa.String(length=255), nullable=False),
        sa.Column('operation', sa.String(length=40), nullable=False),
        sa.Column('invoice_id', sa.BigInteger(), nullable=True),
        sa.Column('organization_id', sa.BigInteger(), nullable=True),
        sa.Column('stripe_object_id', sa.String(length=255), nullable=True),
        sa.Column('started_at', portal.models.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column('finished_at', portal.models.types.UTCDateTime(timezone=True), nullable=True),
        sa.Column('tries', sa.Integer(), server_default='0', nullable=False),
        sa.Column('outcome', sa.String(length=16), nullable=True),
        sa.Column('error', sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_stripe_writes')),
        sa.UniqueConstraint('idempotency_key', name=op.f('uq_stripe_writes_idempotency_key')),
    )
    with op.batch_alter_table('stripe_writes') as batch_op:
        batch_op.create_index('ix_stripe_writes_invoice_started', ['invoice_id', 'started_at'], unique=False)
        batch_op.create_index('ix_stripe_writes_started', ['started_at'], unique=False)
    with op.batch_alter_table('invoices') as batch_op:
        batch_op.drop_column('stripe_key_salt')


def downgrade():
    with op.batch_alter_table('invoices') as batch_op:
        batch_op.add_column(sa.Column('stripe_key_salt', sa.Integer(), server_default='0', nullable=False))
    with op.batch_alter_table('stripe_writes') as batch_op:
        batch_op.drop_index('ix_stripe_writes_started')
        batch_op.drop_index('ix_stripe_writes_invoice_started')
    op.drop_table('stripe_writes')
