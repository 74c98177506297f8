"""support console: indexed search and filters, resends of usage events, an append-only audit

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-28 12:00:00.000000

Invoices keep the outcome of their latest sync run (written with the run, backfilled
here), so "sync failing" is a small index rather than a look through every run.
Support finds organizations by slug, name, billing email and user email through
trigram indexes on PostgreSQL (pg_trgm; plain indexes of the same names on SQLite,
where the table is small enough to scan), and each filter of the front page through
a small partial index. Usage events get an index by the invoice line they were
priced into, and a table of the resends of accepted events (duplicate or conflict).
Audit entries gain the organization, invoice and reason they were about, indexes for
the audit page's filters, and triggers that refuse UPDATE and DELETE: the log is
append-only in the database, whatever code runs against it. The one update allowed
is the foreign key's ON DELETE SET NULL of actor_user_id (the actor's email stays).
"""
from alembic import op
import sqlalchemy as sa

import portal.models.types


# revision identifiers, used by Alembic.
revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None

ACTIVE_INVOICE = "status IN ('open', 'closing')"
PAYMENT_FAILED = "status = 'finalized' AND (payment_attempts > 0 OR payment_problem IS NOT NULL)"
OPEN_NEGATIVE = "status = 'open' AND total_cents < 0"
SYNC_FAILING = "status IN ('open', 'closing') AND last_sync_outcome NOT IN ('synced', 'unchanged')"

PARTIAL_INDEXES = [
    ('ix_invoices_sync_blocked', 'invoices', ['id'], 'sync_blocked IS NOT NULL'),
    ('ix_invoices_active_period_end', 'invoices', ['period_end'], ACTIVE_INVOICE),
    ('ix_invoices_payment_failed', 'invoices', ['period_end'], PAYMENT_FAILED),
    ('ix_invoices_open_negative', 'invoices', ['organization_id'], OPEN_NEGATIVE),
    ('ix_invoices_sync_failing', 'invoices', ['organization_id'], SYNC_FAILING),
    ('ix_sync_runs_noted', 'sync_runs', ['invoice_id', 'started_at'], 'note IS NOT NULL'),
    ('ix_organizations_credit_balance', 'organizations', ['id'], 'stripe_balance_cents < 0'),
]
TRIGRAM_INDEXES = [
    ('ix_organizations_slug_trgm', 'organizations', 'slug'),
    ('ix_organizations_name_trgm', 'organizations', 'name'),
    ('ix_organizations_billing_email_trgm', 'organizations', 'billing_email'),
    ('ix_users_email_trgm', 'users', 'email'),
]
AUDIT_INDEXES = [
    ('ix_audit_entries_created', ['created_at', 'id']),
    ('ix_audit_entries_org_created', ['organization_id', 'created_at']),
    ('ix_audit_entries_actor_created', ['actor', 'created_at']),
    ('ix_audit_entries_action_created', ['action', 'created_at']),
]

# Every column but actor_user_id must stay as it was for an UPDATE to pass, and that
# one may only become NULL (ON DELETE SET NULL); DELETE never passes.
_AUDIT_COLUMNS = ['id', 'actor', 'action', 'object_type', 'object_id', 'organization_id', 'invoice_id',
                  'reason', 'created_at']
_PG_UNCHANGED = ' AND '.join(f'NEW.{c} IS NOT DISTINCT FROM OLD.{c}' for c in _AUDIT_COLUMNS)
_SQLITE_UNCHANGED = ' AND '.join(f'NEW.{c} IS OLD.{c}' for c in _AUDIT_COLUMNS)

PG_AUDIT_FUNCTION = f"""
CREATE FUNCTION audit_entries_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.actor_user_id IS NULL AND {_PG_UNCHANGED}
            AND NEW.details::text IS NOT DISTINCT FROM OLD.details::text THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'audit entries are append-only: % refused', TG_OP USING ERRCODE = 'insufficient_privilege';
END
$$
"""
SQLITE_TRIGGERS = [
    "CREATE TRIGGER audit_entries_no_delete BEFORE DELETE ON audit_entries "
    "BEGIN SELECT RAISE(ABORT, 'audit entries are append-only: DELETE refused'); END",
    "CREATE TRIGGER audit_entries_no_update BEFORE UPDATE ON audit_entries "
    f"WHEN NOT (NEW.actor_user_id IS NULL AND {_SQLITE_UNCHANGED} AND NEW.details IS OLD.details) "
    "BEGIN SELECT RAISE(ABORT, 'audit entries are append-only: UPDATE refused'); END",
]


def _postgresql() -> bool:
    return op.get_bind().dialect.name == 'postgresql'


def upgrade():
    op.create_table(
        'usage_event_resends',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
        sa.Column('sender', sa.String(length=64), nullable=False),
        sa.Column('event_id', sa.String(length=255), nullable=False),
        sa.Column('decision', sa.String(length=16), nullable=False),
        sa.Column('fields', sa.String(length=200), nullable=False),
        sa.Column('received_at', portal.models.types.UTCDateTime(timezone=True), nullable=False),
        sa.CheckConstraint("decision IN ('duplicate', 'conflict')",
                           name=op.f('ck_usage_event_resends_decision_known')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_usage_event_resends')),
    )
    op.create_index('ix_usage_event_resends_sender_event', 'usage_event_resends', ['sender', 'event_id'])
    op.create_index('ix_usage_events_invoice_line', 'usage_events',
                    ['invoice_id', 'product_id', 'resource', 'occurred_at'])
    op.create_index('ix_organizations_name_id', 'organizations', ['name', 'id'])
    if _postgresql():
        op.execute('CREATE EXTENSION IF NOT EXISTS pg_trgm')
    for name, table, column in TRIGRAM_INDEXES:
        if _postgresql():
            op.create_index(name, table, [column], postgresql_using='gin', postgresql_ops={column: 'gin_trgm_ops'})
        else:
            op.create_index(name, table, [column])
    with op.batch_alter_table('invoices') as batch_op:
        batch_op.add_column(sa.Column('last_sync_outcome', sa.String(length=32), nullable=True))
    # The outcome of each open or closing invoice's latest finished run (not "locked").
    op.execute("UPDATE invoices SET last_sync_outcome = (SELECT sync_runs.outcome FROM sync_runs "
               "WHERE sync_runs.invoice_id = invoices.id AND sync_runs.finished_at IS NOT NULL "
               "AND sync_runs.outcome <> 'locked' ORDER BY sync_runs.started_at DESC, sync_runs.id DESC LIMIT 1) "
               "WHERE status IN ('open', 'closing')")
    for name, table, columns, where in PARTIAL_INDEXES:
        op.create_index(name, table, columns, postgresql_where=sa.text(where), sqlite_where=sa.text(where))

    with op.batch_alter_table('audit_entries') as batch_op:
        batch_op.add_column(sa.Column('organization_id', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('invoice_id', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('reason', sa.Text(), nullable=True))
    # What earlier entries were about, from what they recorded (before the triggers).
    op.execute("UPDATE audit_entries SET invoice_id = CAST(object_id AS BIGINT) WHERE object_type = 'invoice'")
    op.execute("UPDATE audit_entries SET organization_id = CAST(object_id AS BIGINT) "
               "WHERE object_type = 'organization'")
    op.execute("UPDATE audit_entries SET organization_id = (SELECT invoices.organization_id FROM invoices "
               "WHERE invoices.id = audit_entries.invoice_id) WHERE invoice_id IS NOT NULL")
    for name, columns in AUDIT_INDEXES:
        op.create_index(name, 'audit_entries', columns)
    if _postgresql():
        op.execute(PG_AUDIT_FUNCTION)
        op.execute('CREATE TRIGGER audit_entries_append_only BEFORE UPDATE OR DELETE ON audit_entries '
                   'FOR EACH ROW EXECUTE FUNCTION audit_entries_append_only()')
    else:
        for statement in SQLITE_TRIGGERS:
            op.execute(statement)


def downgrade():
    if _postgresql():
        op.execute('DROP TRIGGER audit_entries_append_only ON audit_entries')
        op.execute('DROP FUNCTION audit_entries_append_only()')
    else:
        op.execute('DROP TRIGGER audit_entries_no_update')
        op.execute('DROP TRIGGER audit_entries_no_delete')
    for name, _ in reversed(AUDIT_INDEXES):
        op.drop_index(name, table_name='audit_entries')
    with op.batch_alter_table('audit_entries') as batch_op:
        batch_op.drop_column('reason')
        batch_op.drop_column('invoice_id')
        batch_op.drop_column('organization_id')
    for name, table, _, _ in reversed(PARTIAL_INDEXES):
        op.drop_index(name, table_name=table)
    with op.batch_alter_table('invoices') as batch_op:
        batch_op.drop_column('last_sync_outcome')
    for name, table, _ in reversed(TRIGRAM_INDEXES):
        op.drop_index(name, table_name=table)
    op.drop_index('ix_organizations_name_id', table_name='organizations')
    op.drop_index('ix_usage_events_invoice_line', table_name='usage_events')
    op.drop_index('ix_usage_event_resends_sender_event', table_name='usage_event_resends')
    op.drop_table('usage_event_resends')
