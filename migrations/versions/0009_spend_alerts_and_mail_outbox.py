"""spend alerts and mail outbox

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-26 14:39:26.330872

Owners' thresholds on the open invoice's total and on its projection; each crossing
recorded once per alert and invoice (a unique constraint, so two workers evaluating
at once record and mail it once); and the outbox its mail waits in until sent.
"""
from alembic import op
import sqlalchemy as sa
import portal.models.types


# revision identifiers, used by Alembic.
revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('spend_alerts',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('organization_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('threshold_cents', sa.BigInteger(), nullable=False),
    sa.Column('created_at', portal.models.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('created_by', sa.String(length=255), nullable=True),
    sa.CheckConstraint("kind IN ('total', 'projection')", name=op.f('ck_spend_alerts_kind_known')),
    sa.CheckConstraint('threshold_cents > 0', name=op.f('ck_spend_alerts_threshold_positive')),
    sa.ForeignKeyConstraint(['organization_id'], ['organizations.id'], name=op.f('fk_spend_alerts_organization_id_organizations'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_spend_alerts')),
    sa.UniqueConstraint('organization_id', 'kind', 'threshold_cents', name='uq_spend_alerts_org_kind_threshold')
    )
    with op.batch_alter_table('spend_alerts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_spend_alerts_organization_id'), ['organization_id'], unique=False)

    op.create_table('alert_crossings',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('alert_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('invoice_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('amount_cents', sa.BigInteger(), nullable=False),
    sa.Column('crossed_at', portal.models.types.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['alert_id'], ['spend_alerts.id'], name=op.f('fk_alert_crossings_alert_id_spend_alerts'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['invoice_id'], ['invoices.id'], name=op.f('fk_alert_crossings_invoice_id_invoices'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_alert_crossings')),
    sa.UniqueConstraint('alert_id', 'invoice_id', name='uq_alert_crossings_alert_invoice')
    )
    with op.batch_alter_table('alert_crossings', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_alert_crossings_invoice_id'), ['invoice_id'], unique=False)

    op.create_table('mail_outbox',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('crossing_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('recipient', sa.String(length=320), nullable=False),
    sa.Column('subject', sa.String(length=300), nullable=False),
    sa.Column('body', sa.Text(), nullable=False),
    sa.Column('created_at', portal.models.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('sent_at', portal.models.types.UTCDateTime(timezone=True), nullable=True),
    sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['crossing_id'], ['alert_crossings.id'], name=op.f('fk_mail_outbox_crossing_id_alert_crossings'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_mail_outbox')),
    sa.UniqueConstraint('crossing_id', name=op.f('uq_mail_outbox_crossing_id'))
    )
    with op.batch_alter_table('mail_outbox', schema=None) as batch_op:
        batch_op.create_index('ix_mail_outbox_unsent', ['id'], unique=False, postgresql_where=sa.text('sent_at IS NULL'), sqlite_where=sa.text('sent_at IS NULL'))



def downgrade():
    with op.batch_alter_table('mail_outbox', schema=None) as batch_op:
        batch_op.drop_index('ix_mail_outbox_unsent', postgresql_where=sa.text('sent_at IS NULL'), sqlite_where=sa.text('sent_at IS NULL'))

    op.drop_table('mail_outbox')
    with op.batch_alter_table('alert_crossings', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_alert_crossings_invoice_id'))

    op.drop_table('alert_crossings')
    with op.batch_alter_table('spend_alerts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_spend_alerts_organization_id'))

    op.drop_table('spend_alerts')
