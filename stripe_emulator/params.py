"""Request decoding and parameter validation, as strict as Stripe's.

Stripe's v1 API takes ``application/x-www-form-urlencoded`` bodies (and query strings
for GET/DELETE) with bracketed nesting, exactly as ``stripe._encode._api_encode``
produces them: ``lines[0][metadata][k]=v``, ``expand[0]=customer`` (``expand[]=`` is
also accepted), booleans as ``true``/``false``, decimals as strings, ``key=`` (empty)
meaning "unset".

The set of allowed parameters and their types comes from the ``stripe`` package's
generated ``stripe.params.*Params`` TypedDicts (generated from Stripe's OpenAPI
spec): :func:`schema_for` turns one into a small schema tree at import time, and
:func:`validate` checks a decoded request against it, producing Stripe's errors
(``Received unknown parameter: lines[0][foo]``, ``Missing required param: x.``,
``Invalid integer: abc``) and coercing values to Python types (int, bool,
Decimal, list, dict; ``""`` stays ``""`` where Stripe allows it to unset a field).
"""

from __future__ import annotations

import re
import sys
import types
import typing
from decimal import Decimal, InvalidOperation
from urllib.parse import parse_qsl

import stripe
import typing_extensions

from .errors import StripeError, invalid_param, missing_param, unknown_param

# Schema nodes are tuples: (kind, ...)
STR = ("str",)
INT = ("int",)
BOOL = ("bool",)
DEC = ("decimal",)
ANY = ("any",)
EMPTY = ("empty",)  # Literal[''] : "unset"

_RO_KEYS = frozenset(stripe.RequestOptions.__required_keys__ | stripe.RequestOptions.__optional_keys__)
_SEGMENT = re.compile(r"\[([^\[\]]*)\]")
_INT_RE = re.compile(r"^-?\d+$")
_NOT_REQUIRED = {typing_extensions.NotRequired, getattr(typing, "NotRequired", None)}
_REQUIRED = {typing_extensions.Required, getattr(typing, "Required", None)}
_LITERAL = {typing_extensions.Literal, typing.Literal}
_cache: dict[type, tuple] = {}


# --------------------------------------------------------------------------- decoding
def decode_form(pairs: list[tuple[str, str]]) -> dict:
    """Turn ``[("lines[0][amount]", "5"), ...]`` into nested dicts (indices stay keys).

    ``key[]`` appends to a list. Lists written with indices stay dicts keyed by the
    index string until :func:`validate` turns them into lists (it knows which
    parameters are arrays).
    """
    root: dict = {}
    for key, value in pairs:
        b = key.find("[")
        if b <= 0:
            root[key] = value
            continue
        segs = [key[:b], *_SEGMENT.findall(key[b:])]
        cur = root
        for i, seg in enumerate(segs[:-1]):
            if seg == "":  # "a[][b]": a new element of the list
                d: dict = {}
                cur.append(d)
                cur = d
                continue
            want_list = segs[i + 1] == ""
            existing = cur.get(seg)
            if existing is None:
                existing = [] if want_list else {}
                cur[seg] = existing
            elif isinstance(existing, str) or want_list != isinstance(existing, list):
                raise invalid_param(f"Invalid object: {segs[0]}", segs[0])
            cur = existing
        last = segs[-1]
        if last == "":
            cur.append(value)
        elif isinstance(cur, list) or isinstance(cur.get(last), (dict, list)):
            raise invalid_param(f"Invalid object: {segs[0]}", segs[0])
        else:
            cur[last] = value
    return root


def decode_query(qs: str) -> dict:
    """Decode a query string or form body into nested dicts."""
    if not qs:
        return {}
    return decode_form(parse_qsl(qs, keep_blank_values=True))


# --------------------------------------------------------------------------- schemas
def _is_typeddict(tp) -> bool:
    return isinstance(tp, type) and hasattr(tp, "__required_keys__") and hasattr(tp, "__annotations__")


def _resolve(tp, ns):
    if isinstance(tp, str):
        return eval(tp, ns)  # noqa: S307 - generated, trusted stripe package source
    if isinstance(tp, typing.ForwardRef):
        return eval(tp.__forward_arg__, ns)  # noqa: S307
    return tp


def _convert(tp, ns) -> tuple:
    try:
        tp = _resolve(tp, ns)
    except Exception:  # pragma: no cover - unknown name in a generated annotation
        return ANY
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in _NOT_REQUIRED or origin in _REQUIRED:
        return _convert(args[0], ns)
    if tp is str:
        return STR
    if tp is bool:
        return BOOL
    if tp is int:
        return INT
    if tp in (Decimal, float):
        return DEC
    if origin in _LITERAL:
        vals = [a for a in args if isinstance(a, str)]
        if vals == [""]:
            return EMPTY
        enum = ("enum", frozenset(v for v in vals if v != ""))
        return ("union", (EMPTY, enum)) if "" in vals else enum
    if origin in (typing.Union, types.UnionType):
        opts = [_convert(a, ns) for a in args]
        has_enum = any(o[0] == "enum" for o in opts)
        # The library widens enums with "|str" for forward compatibility; the
        # server is strict, so keep the enum only.
        if has_enum:
            opts = [o for o in opts if o != STR]
        # Dict[str,str] | UntypedStripeObject[str] are the same thing.
        uniq: list = []
        for o in opts:
            if o not in uniq:
                uniq.append(o)
        return uniq[0] if len(uniq) == 1 else ("union", tuple(uniq))
    if origin in (list, list):
        return ("list", _convert(args[0], ns) if args else ANY)
    if origin in (dict, dict):
        return ("map", _convert(args[1], ns) if len(args) > 1 else ANY)
    if origin is not None and getattr(origin, "__name__", "") == "UntypedStripeObject":
        return ("map", STR)
    if _is_typeddict(tp):
        return schema_for(tp)
    return ANY


def schema_for(cls, *, top_level: bool = False) -> tuple:
    """Schema tree for a ``stripe.params`` TypedDict (RequestOptions keys removed)."""
    key = (cls, top_level)
    if key in _cache:
        return _cache[key]
    fields: dict[str, tuple] = {}
    node = ("obj", fields, frozenset())
    _cache[key] = node  # recursion guard
    ns = dict(vars(sys.modules[cls.__module__]))
    ns.setdefault("Literal", typing_extensions.Literal)
    required = set(cls.__required_keys__)
    annotations: dict = {}
    for base in reversed(cls.__mro__):
        annotations.update(getattr(base, "__annotations__", {}))
    for name, tp in annotations.items():
        if top_level and name in _RO_KEYS:
            continue
        fields[name] = _convert(tp, ns)
    if top_level:
        required -= _RO_KEYS
    node = ("obj", fields, frozenset(required & set(fields)))
    _cache[key] = node
    return node


def endpoint_schema(name: str) -> tuple:
    """Schema of ``stripe.params.<name>`` (dotted for sub-packages, e.g. ``billing_portal.SessionCreateParams``)."""
    mod = stripe.params
    parts = name.split(".")
    for p in parts[:-1]:
        mod = getattr(mod, p)
    return schema_for(getattr(mod, parts[-1]), top_level=True)


def allowed_keys(name: str) -> frozenset:
    """Top-level parameter names an endpoint accepts (for documentation and tests)."""
    return frozenset(endpoint_schema(name)[1])


# --------------------------------------------------------------------------- validation
def _path(parent: str, key) -> str:
    return f"{parent}[{key}]" if parent else str(key)


def validate(node: tuple, value, path: str = ""):
    """Check ``value`` (as decoded) against ``node``; return the coerced value.

    Raises :class:`StripeError` with Stripe's wording on the first problem.
    """
    kind = node[0]
    if kind == "obj":
        if not isinstance(value, dict):
            raise invalid_param(f"Invalid object{': ' + path if path else ''}", path or None)
        fields, required = node[1], node[2]
        out = {}
        for k, v in value.items():
            sub = fields.get(k)
            if sub is None:
                raise unknown_param(_path(path, k))
            out[k] = validate(sub, v, _path(path, k))
        for r in required:
            if r not in out:
                raise missing_param(_path(path, r))
        return out
    if kind == "str":
        if not isinstance(value, str):
            raise invalid_param(f"Invalid string: {_describe(value)}", path)
        return value
    if kind == "int":
        if isinstance(value, str) and _INT_RE.match(value):
            return int(value)
        raise invalid_param(f"Invalid integer: {_describe(value)}", path)
    if kind == "bool":
        if value in ("true", "false"):
            return value == "true"
        raise invalid_param(f"Invalid boolean: {_describe(value)}", path)
    if kind == "decimal":
        if isinstance(value, str):
            try:
                d = Decimal(value)
                if d.is_finite():
                    return d
            except InvalidOperation:
                pass
        raise invalid_param(f"Invalid decimal: {_describe(value)}", path)
    if kind == "enum":
        if isinstance(value, str) and value in node[1]:
            return value
        opts = sorted(node[1])
        listed = ", ".join(f"`{o}`" for o in opts[:-1]) + (f", or `{opts[-1]}`" if len(opts) > 1 else f"`{opts[-1]}`")
        raise invalid_param(f"Invalid {path}: must be one of {listed}", path)
    if kind == "empty":
        if value == "":
            return ""
        raise invalid_param(f"Invalid {path}: must be empty", path)
    if kind == "list":
        if isinstance(value, dict):
            try:
                items = sorted(value.items(), key=lambda kv: int(kv[0]))
            except ValueError:
                raise invalid_param(f"Invalid array: {path}", path) from None
            return [validate(node[1], v, _path(path, k)) for k, v in items]
        if isinstance(value, list):
            return [validate(node[1], v, _path(path, i)) for i, v in enumerate(value)]
        raise invalid_param(f"Invalid array: {path}", path)
    if kind == "map":
        if not isinstance(value, dict):
            raise invalid_param(f"Invalid object: {path}", path)
        return {k: validate(node[1], v, _path(path, k)) for k, v in value.items()}
    if kind == "union":
        if value == "" and EMPTY in node[1]:
            return ""
        errors = []
        for opt in node[1]:
            if opt is EMPTY or opt == EMPTY:
                if value == "":
                    return ""
                errors.append((opt, invalid_param(f"Invalid {path}: must be empty", path)))
                continue
            try:
                return validate(opt, value, path)
            except StripeError as e:
                errors.append((opt, e))
        # Report the error of the option shaped like the value (object, array, ...).
        if not isinstance(value, str):
            for opt, e in errors:
                if opt[0] in ("obj", "map", "list"):
                    raise e
        for opt, e in errors:
            if opt != EMPTY:
                raise e
        raise errors[0][1]
    return value  # ANY


def _describe(value) -> str:
    if isinstance(value, str):
        return value
    return "(object)" if isinstance(value, dict) else "(array)"


def check_metadata(meta, path: str = "metadata") -> None:
    """Stripe's metadata limits: 50 keys, keys ≤ 40 chars, values ≤ 500 chars."""
    if not isinstance(meta, dict):
        return
    if len(meta) > 50:
        raise StripeError(
            f"Invalid metadata: metadata can have up to 50 keys, but currently has {len(meta)} keys.",
            param=path,
        )
    for k, v in meta.items():
        if len(k) > 40:
            raise StripeError(
                f"Invalid metadata: metadata keys can be up to 40 characters long, but key {k!r} is {len(k)}.",
                param=f"{path}[{k}]",
            )
        if isinstance(v, str) and len(v) > 500:
            raise StripeError(
                "Invalid metadata: metadata values can be up to 500 characters long, but the value for "
                f"{k!r} is {len(v)}.",
                param=f"{path}[{k}]",
            )


def apply_metadata(current: dict, update) -> dict:
    """Stripe's metadata update: ``""`` clears all; a key set to ``""`` is removed."""
    if update is None:
        return current
    if update == "":
        return {}
    new = dict(current)
    for k, v in update.items():
        if v == "":
            new.pop(k, None)
        else:
            new[k] = v
    check_metadata(new)
    return new
