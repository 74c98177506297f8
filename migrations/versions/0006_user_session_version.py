"""sessions that end: a per-user session version

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 12:00:00.000000

The id a session cookie carries is the user's id and their session version; signing
out and a new password move the version on, so a cookie issued before (copied,
stolen, or left in another browser) no longer signs anyone in. Existing users start
at 0; cookies issued before this migration carry no version and stop working too.
"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('users') as batch_op:
        batch_op.add_column(sa.Column('session_version', sa.Integer(), server_default='0', nullable=False))


def downgrade():
    with op.batch_alter_table('users') as batch_op:
        batch_op.drop_column('session_version')
