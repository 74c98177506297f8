"""`GET /api/v1/openapi.json` (the OpenAPI 3.1 document) and `GET /api/v1/docs` (a
readable reference built from it). Both are public: they describe the API, they
reach no data."""
from __future__ import annotations

from flask import jsonify, render_template

from portal.api.auth import public
from portal.api.openapi import document, operations
from portal.api.routes import bp


@bp.get("/openapi.json")
@public
def openapi_document():
    return jsonify(document())


@bp.get("/docs")
@public
def api_reference():
    doc = document()
    return render_template("api/docs.html", info=doc["info"], base=doc["servers"][0]["url"],
                           operations=operations(doc), schemas=doc["components"]["schemas"])
