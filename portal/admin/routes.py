from __future__ import annotations

from functools import wraps

from flask import Blueprint, abort, render_template
from flask_login import current_user, login_required
from sqlalchemy import func, select

from portal.extensions import db
from portal.models import Invoice, Organization

bp = Blueprint("admin", __name__)


def support_required(view):
    @wraps(view)
    @login_required
    def wrapper(*args, **kwargs):
        if not current_user.is_support:
            abort(403)
        return view(*args, **kwargs)

    return wrapper


@bp.get("/")
@support_required
def index():
    rows = db.session.execute(
        select(Organization, Invoice)
        .outerjoin(
            Invoice, (Invoice.organization_id == Organization.id) & (Invoice.status == "open")
        )
        .order_by(Organization.name)
    ).all()
    unsynced = db.session.scalar(
        select(func.count()).select_from(Invoice).where(Invoice.change_seq > Invoice.synced_seq)
    )
    return render_template("admin/index.html", rows=rows, unsynced=unsynced)
