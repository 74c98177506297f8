"""Request bodies read safely: a size limit that holds for chunked bodies too, and
JSON whose nesting is bounded.

Werkzeug applies MAX_CONTENT_LENGTH to a body sent with Content-Length (413), but a
chunked body is cut at the limit and what fits is read as if it were all; here a body
one byte over the limit is refused whole. Python's json module parses nesting by
recursion, so thousands of nested brackets raise RecursionError (a 500); here they,
and anything nested deeper than `max_depth`, are a ValueError the caller answers 400.
"""
from __future__ import annotations

import json
import re
from itertools import accumulate

from flask import current_app, request
from werkzeug.exceptions import RequestEntityTooLarge

# Deeper than any body the portal accepts: a usage batch is 3 levels, a Stripe event
# about 10.
MAX_JSON_DEPTH = 64
_CHUNK = 64 * 1024


def read_body(limit: int | None = None) -> bytes:
    """The raw body, at most `limit` bytes (default MAX_CONTENT_LENGTH); a longer body,
    chunked or not, raises RequestEntityTooLarge (413) without being kept."""
    if limit is None:
        limit = current_app.config.get("MAX_CONTENT_LENGTH") or 8 * 1024 * 1024
    if request.content_length is not None and request.content_length > limit:
        raise RequestEntityTooLarge(f"the body is larger than {limit} bytes")
    # The raw WSGI input: a chunked body is not cut at MAX_CONTENT_LENGTH here, so one
    # byte more than the limit shows that it was longer.
    stream = request.environ.get("wsgi.input")
    if request.content_length is None and "wsgi.input_terminated" not in request.environ:
        return b""  # no length and no terminated stream: nothing can be read safely
    remaining = (limit + 1) if request.content_length is None else request.content_length
    parts, size = [], 0
    while remaining > 0:
        chunk = stream.read(min(_CHUNK, remaining))
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
        remaining -= len(chunk)
        if size > limit:
            raise RequestEntityTooLarge(f"the body is larger than {limit} bytes")
    return b"".join(parts)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def loads(raw: bytes | str, *, parse_float=None, max_depth: int = MAX_JSON_DEPTH):
    """json.loads, refusing NaN/Infinity, nesting deeper than `max_depth` (checked
    before parsing, so no recursion is spent on it) and invalid UTF-8: ValueError."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"the body is not UTF-8: {error}") from None
    depth = nesting_depth(raw)
    if depth > max_depth:
        raise ValueError(f"JSON nested {depth} levels deep; at most {max_depth} are accepted")
    try:
        return json.loads(raw, parse_float=parse_float, parse_constant=_refuse_constant)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def nesting_depth(text: str) -> int:
    """The deepest nesting of [ and { outside strings (regular expressions and a
    running sum, no parsing and no recursion)."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}
