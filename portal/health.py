"""`GET /healthz`: does the portal reach its database and Redis?"""
from __future__ import annotations

from flask import Blueprint, jsonify
from sqlalchemy import text

from portal.extensions import db
from portal.queue import redis_connection

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    checks = {"database": "ok", "redis": "ok"}
    try:
        db.session.execute(text("SELECT 1"))
    except Exception as exc:  # any failure to answer means down
        checks["database"] = f"down: {type(exc).__name__}"
        db.session.rollback()
    try:
        redis_connection().ping()
    except Exception as exc:
        checks["redis"] = f"down: {type(exc).__name__}"
    healthy = all(value == "ok" for value in checks.values())
    return jsonify(checks), 200 if healthy else 503
