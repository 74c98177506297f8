"""Stripe-shaped API errors.

Every refusal the emulator makes is a :class:`StripeError`; the server turns it into
Stripe's error body ``{"error": {"type", "code", "message", "param", "doc_url"}}``.
"""

from __future__ import annotations


class StripeError(Exception):
    """An API error with Stripe's shape.

    ``store`` says whether the idempotency layer may store this response for the
    request's ``Idempotency-Key`` (Stripe does not store parameter-validation
    failures, 401s, 409 conflicts or 429s; it does store errors raised once the
    endpoint started executing).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        decline_code: str | None = None,
        headers: dict | None = None,
        store: bool = True,
        extra: dict | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.code = code
        self.param = param
        self.decline_code = decline_code
        self.headers = headers or {}
        self.store = store
        self.extra = extra or {}

    def body(self) -> dict:
        """The JSON body Stripe sends for this error."""
        err = {
            "type": self.type,
            "code": self.code,
            "message": self.message,
            "param": self.param,
            "doc_url": (f"https://stripe.com/docs/error-codes/{self.code.replace('_', '-')}" if self.code else None),
        }
        if self.decline_code:
            err["decline_code"] = self.decline_code
        err.update(self.extra)
        return {"error": err}


def invalid_param(message: str, param: str | None, *, code: str | None = "parameter_invalid") -> StripeError:
    """A parameter-validation failure (never stored for idempotency)."""
    return StripeError(message, param=param, code=code, store=False)


def unknown_param(name: str) -> StripeError:
    """``Received unknown parameter: NAME`` exactly as Stripe words it."""
    return StripeError(
        f"Received unknown parameter: {name}",
        param=name,
        code="parameter_unknown",
        store=False,
    )


def missing_param(name: str) -> StripeError:
    """``Missing required param: NAME.`` exactly as Stripe words it."""
    return StripeError(
        f"Missing required param: {name}.",
        param=name,
        code="parameter_missing",
        store=False,
    )


def no_such(kind: str, obj_id: str, param: str = "id") -> StripeError:
    """404 ``resource_missing`` for an unknown id."""
    return StripeError(
        f"No such {kind}: '{obj_id}'",
        status=404,
        code="resource_missing",
        param=param,
    )
