"""JSON errors in the Contract's shape: {"error": {"code", "message", "details"}}."""
from __future__ import annotations

from flask import jsonify


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, details: object | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details


def error_response(status: int, code: str, message: str, details: object | None = None):
    body = {"error": {"code": code, "message": message, "details": details}}
    return jsonify(body), status
