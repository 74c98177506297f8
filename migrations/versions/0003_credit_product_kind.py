"""credit product kind

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 14:40:00.000000

Products may be of kind 'credit': the portal's own product that support's credits
(negative invoice lines) are billed under. Written by hand: autogenerate does not
see CHECK changes.
"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

CONSTRAINT = 'ck_products_kind_known'


def upgrade():
    _replace_kind_check("kind IN ('metered', 'recurring', 'credit')")


def downgrade():
    # Credit lines sit on invoices and move their totals: dropping them here would
    # silently change what customers owe, so refuse instead of losing them.
    credits = op.get_bind().scalar(sa.text("SELECT count(*) FROM products WHERE kind = 'credit'"))
    if credits:
        raise RuntimeError(
            f"{credits} product(s) of kind 'credit' exist (support credits on invoices); "
            "remove them and their invoice items before downgrading past 0003"
        )
    _replace_kind_check("kind IN ('metered', 'recurring')")


def _replace_kind_check(condition: str) -> None:
    with op.batch_alter_table('products') as batch_op:
        batch_op.drop_constraint(op.f(CONSTRAINT), type_='check')
        batch_op.create_check_constraint(op.f(CONSTRAINT), condition)
