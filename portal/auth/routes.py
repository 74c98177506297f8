from __future__ import annotations

from urllib.parse import urlsplit

from flask import Blueprint, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required, login_user, logout_user
from sqlalchemy import func, select

from portal.auth.forms import LoginForm
from portal.extensions import db, login_manager
from portal.models import User

bp = Blueprint("auth", __name__)


@login_manager.user_loader
def load_user(user_id: str) -> User | None:
    return db.session.get(User, int(user_id))


def _home_for(user: User) -> str:
    return url_for("admin.index") if user.is_support else url_for("customer.billing")


@bp.route("/login", methods=["GET", "POST"])
def login():
    if current_user.is_authenticated:
        return redirect(_home_for(current_user))
    form = LoginForm()
    if form.validate_on_submit():
        email = form.email.data.strip().lower()
        user = db.session.scalar(select(User).where(func.lower(User.email) == email))
        if user is None or not user.check_password(form.password.data):
            flash("Wrong email or password.", "error")
            return render_template("auth/login.html", form=form), 401
        login_user(user)
        target = request.args.get("next", "")
        # Only same-site relative paths: never an open redirect.
        if not target.startswith("/") or target.startswith("//") or urlsplit(target).netloc:
            target = _home_for(user)
        return redirect(target)
    return render_template("auth/login.html", form=form)


@bp.post("/logout")
@login_required
def logout():
    logout_user()
    return redirect(url_for("auth.login"))
