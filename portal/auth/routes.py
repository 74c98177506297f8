from __future__ import annotations

from urllib.parse import urlsplit

from flask import Blueprint, flash, redirect, render_template, request, session, url_for
from flask_login import current_user, login_required, login_user, logout_user
from sqlalchemy import func, select

from portal import passwords
from portal.audit import record_support_action
from portal.auth.forms import LoginForm
from portal.extensions import db, login_manager
from portal.models import User
from portal.security import limit_login_attempts

bp = Blueprint("auth", __name__)


@login_manager.user_loader
def load_user(session_id: str) -> User | None:
    """The user a session cookie names, if its session version is still the user's
    (signing out and a new password move it on): `User.get_id` is "<id>:<version>"."""
    user_id, _, version = session_id.partition(":")
    if not (user_id.isdigit() and version.isdigit()):
        return None  # a cookie from before session versions
    user = db.session.get(User, int(user_id))
    if user is None or user.session_version != int(version):
        return None
    return user


def _home_for(user: User) -> str:
    return url_for("admin.index") if user.is_support else url_for("customer.billing")


@bp.route("/login", methods=["GET", "POST"])
@limit_login_attempts
def login():
    if current_user.is_authenticated:
        return redirect(_home_for(current_user))
    form = LoginForm()
    if form.validate_on_submit():
        email = form.email.data.strip().lower()
        user = db.session.scalar(select(User).where(func.lower(User.email) == email))
        if user is None:
            passwords.verify_dummy(form.password.data)  # as slow as a wrong password
        if user is None or not user.check_password(form.password.data):
            flash("Wrong email or password.", "error")
            return render_template("auth/login.html", form=form), 401
        if user.password_needs_rehash():
            user.rehash_password(form.password.data)  # an older scheme or cost: argon2id now
            db.session.commit()
        if user.is_support:  # support's sign-ins are part of the audit of what support did
            record_support_action(user, "support.sign_in", detail={"remote_addr": request.remote_addr})
            db.session.commit()
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
    """Sign out: this cookie, and every other one issued to the user, stops working."""
    current_user.end_sessions()
    db.session.commit()
    logout_user()
    session.clear()
    flash("You are signed out.", "success")  # after the clear, which empties the flashes too
    return redirect(url_for("auth.login"))
