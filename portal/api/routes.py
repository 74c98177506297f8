from __future__ import annotations

from flask import Blueprint, jsonify
from sqlalchemy import select
from werkzeug.exceptions import HTTPException

from portal.api.auth import authenticate
from portal.api.errors import ApiError, error_response
from portal.extensions import db
from portal.models import Product

bp = Blueprint("api", __name__)


@bp.before_request
def _require_token():
    authenticate()


@bp.errorhandler(ApiError)
def _api_error(error: ApiError):
    return error_response(error.status, error.code, error.message, error.details)


@bp.errorhandler(HTTPException)
def _http_error(error: HTTPException):
    code = (error.name or "error").lower().replace(" ", "_")
    return error_response(error.code or 500, code, error.description or error.name)


@bp.get("/products")
def products():
    rows = db.session.scalars(select(Product).where(Product.active).order_by(Product.code))
    return jsonify(
        {
            "products": [
                {
                    "code": product.code,
                    "name": product.name,
                    "unit": product.unit,
                    "unit_price": f"{product.unit_price.normalize():f}",
                    "kind": product.kind,
                }
                for product in rows
            ]
        }
    )
