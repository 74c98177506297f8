"""Jinja filters for money and times."""
from __future__ import annotations

from datetime import datetime

from flask import Flask

from portal.money import format_money, format_price


def register_filters(app: Flask) -> None:
    app.jinja_env.filters["money"] = format_money
    app.jinja_env.filters["price"] = format_price
    app.jinja_env.filters["utc"] = _utc
    app.jinja_env.filters["quantity"] = _quantity


def _utc(value: datetime | None, with_time: bool = True) -> str:
    if value is None:
        return "—"
    return value.strftime("%Y-%m-%d %H:%M UTC" if with_time else "%Y-%m-%d")


def _quantity(value) -> str:
    text = f"{value.normalize():f}" if hasattr(value, "normalize") else str(value)
    return text
