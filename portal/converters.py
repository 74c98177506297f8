"""URL converters: a URL part that cannot name a row is a 404 before any view runs.

`dbint`: a row id, 1 to 2**63-1 (the databases' BIGINT; SQLite's INTEGER is the same
64 bits) in ASCII digits without a leading zero. Werkzeug's `int` matches any number
of digits (and any script's digits), and a 23-digit id reached the database driver,
which refused it with a 500.

`slug`: an organization's slug, as the API accepts them when it creates one.

`jobid`: a queued job's id as RQ allows them (ASCII letters, digits, '_' and '-'; RQ
raised ValueError, a 500, on anything else).
"""
from __future__ import annotations

from flask import Flask
from werkzeug.routing import BaseConverter, ValidationError

MAX_DATABASE_ID = 2**63 - 1


def _at_most(limit: int) -> str:
    """A regular expression for the decimal numbers 1..limit, without leading zeros:
    out of range is no match at all (a converter that matched and then refused would
    let Werkzeug answer 405 when another method's rule has the same path)."""
    digits = str(limit)
    shorter = f"[1-9][0-9]{{0,{len(digits) - 2}}}" if len(digits) > 1 else None
    same_length = []
    for i, digit in enumerate(digits):
        low = 1 if i == 0 else 0
        if int(digit) > low:
            rest = len(digits) - i - 1
            same_length.append(f"{digits[:i]}[{low}-{int(digit) - 1}]" + (f"[0-9]{{{rest}}}" if rest else ""))
    same_length.append(digits)
    return "|".join(filter(None, [shorter, *same_length]))


class DatabaseIdConverter(BaseConverter):
    regex = f"(?:{_at_most(MAX_DATABASE_ID)})"
    weight = 50

    def to_python(self, value: str) -> int:
        number = int(value)
        if not 1 <= number <= MAX_DATABASE_ID:  # the regex allows no other; kept as a guard
            raise ValidationError()
        return number

    def to_url(self, value: int) -> str:
        return str(int(value))


class SlugConverter(BaseConverter):
    """Lower-case ASCII letters, digits and dashes, at most 63, starting with a letter
    or digit (no '/', no control characters, no trailing newline)."""

    regex = r"[a-z0-9][a-z0-9-]{0,62}"


class JobIdConverter(BaseConverter):
    regex = r"[A-Za-z0-9_-]{1,128}"


def register(app: Flask) -> None:
    """Make `<dbint:...>`, `<slug:...>` and `<jobid:...>` available to the app's routes
    (call before registering blueprints)."""
    app.url_map.converters["dbint"] = DatabaseIdConverter
    app.url_map.converters["slug"] = SlugConverter
    app.url_map.converters["jobid"] = JobIdConverter
