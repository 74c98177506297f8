"""Error pages for people: 403, 404 and 500 inside the portal's layout, each with a
way back. The JSON API answers its own errors in its own shape (`portal.api`)."""
from __future__ import annotations

import logging

from flask import Flask, render_template
from werkzeug.exceptions import HTTPException, InternalServerError

from portal.extensions import db

log = logging.getLogger(__name__)

TITLES = {
    403: "You cannot do that here",
    404: "There is nothing at this address",
    405: "That is not how this page is used",
    500: "Something went wrong on our side",
}
EXPLANATIONS = {
    403: "Your account does not have the right to see this or to make this change.",
    404: "The page may have moved, or the link may be mistyped or out of date.",
    405: "This address does not answer that kind of request.",
    500: "Nothing you did caused it, and it has been logged. Please try again in a moment.",
}


def error_page(error: HTTPException):
    """The portal's page for an HTTP error (its own words, and the reason given by
    the view when it gave one)."""
    code = error.code or 500
    if code >= 500:
        db.session.rollback()
    default = type(error).description
    reason = error.description if error.description and error.description != default else None
    try:
        body = render_template("errors/error.html", code=code, title=TITLES.get(code, error.name),
                               explanation=EXPLANATIONS.get(code, default), reason=reason)
    except Exception:  # the layout itself failed (the database is away): plain words
        log.exception("the error page could not be rendered")
        body = f"{code} {error.name}"
    return body, code


def _server_error(error: InternalServerError):
    return error_page(error)


def init_error_pages(app: Flask) -> None:
    """Register the pages. Called before the blueprints are registered: the API's
    routing-error handler (404, 405) is registered after and hands non-API paths back
    to `error_page`."""
    app.register_error_handler(403, error_page)
    app.register_error_handler(404, error_page)
    app.register_error_handler(405, error_page)
    app.register_error_handler(InternalServerError, _server_error)
