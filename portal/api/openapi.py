"""The OpenAPI 3.1 description of the JSON API under /api/v1.

Built here rather than kept as a file so that limits come from the code that
enforces them. `tests/test_openapi.py` checks that every rule of the `api` blueprint
is described and nothing else is, and that the document is valid OpenAPI 3.1;
`tests/test_api_fuzz.py` checks the live API's answers against it.
"""
from __future__ import annotations

import copy
from functools import cache

from portal.billing.usage import MAX_BATCH_EVENTS
from portal.models.billing import INVOICE_STATUSES, SYNC_TRIGGERS
from portal.models.catalog import PRODUCT_KINDS

BIGINT_MAX = 2**63 - 1
SLUG_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
JSON = "application/json"


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict) -> dict:
    return {"oneOf": [schema, {"type": "null"}]}


def _object(properties: dict, required: list[str] | None = None, *, closed: bool = True) -> dict:
    schema = {"type": "object", "properties": properties,
              "required": list(properties) if required is None else required}
    if closed:
        schema["additionalProperties"] = False
    return schema


TIMESTAMP = {"type": "string", "format": "date-time", "description": "RFC 3339, UTC (`Z`)"}
DECIMAL_TEXT = {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]+)?$", "description": "an exact decimal"}
QUANTITY_IN = {
    "description": "a non-negative decimal: a JSON number or its text (`\"1.25\"`), at most 9 decimal places",
    "oneOf": [{"type": "string", "pattern": r"^[0-9]+(\.[0-9]{1,9})?$"}, {"type": "number", "minimum": 0}],
}

SCHEMAS: dict[str, dict] = {
    "Error": {
        "description": "Every error answer of the API.",
        **_object({"error": _object({
            "code": {"type": "string", "description": "machine-readable, e.g. `invalid_request`, `not_found`"},
            "message": {"type": "string"},
            "details": {"description": "what was wrong, when the code says more than the message (or null)"},
        })}),
    },
    "Product": _object({
        "code": {"type": "string"},
        "name": {"type": "string"},
        "unit": {"type": "string"},
        "unit_price": {**DECIMAL_TEXT, "description": "decimal cents"},
        "kind": {"type": "string", "enum": list(PRODUCT_KINDS)},
    }),
    "NewOrganization": _object({
        "slug": {"type": "string", "pattern": SLUG_PATTERN},
        "name": {"type": "string", "minLength": 1, "maxLength": 200},
        "email": {"type": "string", "format": "email", "maxLength": 254},
        "currency": {"type": "string", "pattern": "^[a-z]{3}$", "default": "usd"},
        "cycle_anchor_day": {"type": "integer", "minimum": 1, "maximum": 31, "default": 1},
    }, required=["slug", "name", "email"], closed=False),
    "Organization": _object({
        "slug": {"type": "string"},
        "name": {"type": "string"},
        "email": {"type": "string"},
        "currency": {"type": "string"},
        "cycle_anchor_day": {"type": "integer", "minimum": 1, "maximum": 31},
        "open_invoice": {"type": "integer", "description": "the id of the organization's open invoice"},
    }),
    "UsageEvent": _object({
        "id": {"type": "string", "minLength": 1, "maxLength": 255,
               "description": "unique per sender: an event sent again is counted once"},
        "organization": {"type": "string", "description": "the organization's slug"},
        "product": {"type": "string", "description": "a metered product's code"},
        "quantity": QUANTITY_IN,
        "occurred_at": {"type": "string", "format": "date-time",
                        "description": "RFC 3339 with a time zone offset, not in the future"},
        "resource": _nullable({"type": "string", "maxLength": 200}),
    }, required=["id", "organization", "product", "quantity", "occurred_at"]),
    "UsageBatch": _object({
        "events": {"type": "array", "items": _ref("UsageEvent"), "maxItems": MAX_BATCH_EVENTS},
    }, closed=False),
    "UsageResult": _object({
        "accepted": {"type": "integer", "minimum": 0},
        "duplicates": {"type": "integer", "minimum": 0},
    }),
    "NewService": _object({
        "product": {"type": "string", "description": "a recurring product's code"},
        "quantity": {**QUANTITY_IN, "default": 1, "description": "greater than zero"},
        "resource": _nullable({"type": "string", "maxLength": 200}),
    }, required=["product"], closed=False),
    "QuantityChange": _object({"quantity": {**QUANTITY_IN, "description": "greater than zero"}},
                              closed=False),
    "Service": _object({
        "id": {"type": "integer"},
        "organization": {"type": "string"},
        "product": {"type": "string"},
        "quantity": DECIMAL_TEXT,
        "resource": {"type": "string"},
        "attached_at": TIMESTAMP,
        "detached_at": _nullable(TIMESTAMP),
    }),
    "ServiceReplacement": {
        "description": "The attachment that carries on at the new quantity; `replaces` is the one it ended.",
        **_object({
            "id": {"type": "integer"},
            "organization": {"type": "string"},
            "product": {"type": "string"},
            "quantity": DECIMAL_TEXT,
            "resource": {"type": "string"},
            "attached_at": TIMESTAMP,
            "detached_at": _nullable(TIMESTAMP),
            "replaces": {"type": "integer"},
        }),
    },
    "Period": _object({"start": TIMESTAMP, "end": TIMESTAMP}),
    "InvoiceItem": _object({
        "id": {"type": "integer"},
        "product": {"type": "string"},
        "resource": {"type": "string"},
        "description": {"type": "string"},
        "quantity": DECIMAL_TEXT,
        "unit_price": {**DECIMAL_TEXT, "description": "decimal cents"},
        "amount": {"type": "integer", "description": "cents"},
        "period": _nullable(_ref("Period")),
    }),
    "Invoice": _object({
        "id": {"type": "integer"},
        "organization": {"type": "string"},
        "period": _ref("Period"),
        "status": {"type": "string", "enum": list(INVOICE_STATUSES)},
        "currency": {"type": "string"},
        "total": {"type": "integer", "description": "cents"},
        "stripe_invoice_id": {"type": ["string", "null"]},
        "number": {"type": ["string", "null"]},
        "hosted_invoice_url": {"type": ["string", "null"]},
        "invoice_pdf": {"type": ["string", "null"]},
        "has_unsynced_changes": {"type": "boolean"},
        "past_due": {"type": "boolean"},
        "payment": _object({
            "amount_due": {"type": ["integer", "null"]},
            "amount_paid": {"type": ["integer", "null"]},
            "attempts": {"type": "integer", "minimum": 0},
            "next_attempt": _nullable(TIMESTAMP),
            "problem": {"type": ["string", "null"]},
            "carried_to_balance": {"type": "integer"},
        }),
        "last_sync": _nullable(_object({
            "at": _nullable(TIMESTAMP),
            "outcome": {"type": ["string", "null"]},
        })),
        "items": {"type": "array", "items": _ref("InvoiceItem")},
    }),
    "SyncQueued": _object({"job_id": {"type": "string"}}),
    "Job": _object({
        "id": {"type": "string"},
        "status": {"type": "string", "enum": ["queued", "started", "deferred", "finished", "stopped", "scheduled",
                                              "canceled", "failed"]},
        "result": {"description": "what the job returned (finished jobs)"},
        "error": {"type": "string", "description": "the last line of the failure (failed jobs)"},
    }, required=["id", "status"]),
    "SyncRun": _object({
        "id": {"type": "integer"},
        "trigger": {"type": "string", "enum": list(SYNC_TRIGGERS)},
        "outcome": {"type": ["string", "null"]},
        "started_at": TIMESTAMP,
        "finished_at": _nullable(TIMESTAMP),
        "duration_seconds": {"type": ["number", "null"]},
        "created": {"type": "integer"},
        "updated": {"type": "integer"},
        "deleted": {"type": "integer"},
        "unchanged": {"type": "integer"},
        "stripe_reads": {"type": "integer"},
        "stripe_writes": {"type": "integer"},
        "stripe_calls": {"type": "integer"},
        "error": {"type": ["string", "null"]},
        "job_id": {"type": ["string", "null"]},
    }),
}


def _json_response(description: str, schema: dict) -> dict:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _error(description: str) -> dict:
    return _json_response(description, _ref("Error"))


ERRORS = {
    "400": _error("the body is not a JSON object (`invalid_json`)"),
    "401": _error("no bearer token, or not a valid one (`unauthorized`)"),
    "404": _error("no such object (`not_found`)"),
    "409": _error("conflicts with what exists (`conflict`)"),
    "413": _error("the body or the batch is too large (`request_entity_too_large`, `batch_too_large`)"),
    "422": _error("a field is not valid (`invalid_request`, `invalid_events`); `details` names it"),
}


def _errors(*codes: str) -> dict:
    return {code: ERRORS[code] for code in ("401", *codes)}


def _body(name: str, description: str) -> dict:
    return {"required": True, "description": description, "content": {JSON: {"schema": _ref(name)}}}


SLUG = {"name": "slug", "in": "path", "required": True, "description": "the organization's slug",
        "schema": {"type": "string", "pattern": SLUG_PATTERN}}
INVOICE_ID = {"name": "invoice_id", "in": "path", "required": True,
              "schema": {"type": "integer", "minimum": 1, "maximum": BIGINT_MAX}}
SERVICE_ID = {"name": "service_id", "in": "path", "required": True,
              "schema": {"type": "integer", "minimum": 1, "maximum": BIGINT_MAX}}
JOB_ID = {"name": "job_id", "in": "path", "required": True, "description": "as answered by a sync request",
          "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,128}$"}}


PATHS: dict[str, dict] = {
    "/products": {"get": {
        "operationId": "listProducts", "tags": ["catalog"], "summary": "The active catalog",
        "responses": {"200": _json_response("the active products, by code", _object({
            "products": {"type": "array", "items": _ref("Product")}})), **_errors()},
    }},
    "/organizations": {"post": {
        "operationId": "createOrganization", "tags": ["organizations"],
        "summary": "Create an organization and its first open invoice",
        "requestBody": _body("NewOrganization", "the organization"),
        "responses": {"201": _json_response("created", _ref("Organization")),
                      **_errors("400", "409", "413", "422")},
    }},
    "/usage": {"post": {
        "operationId": "reportUsage", "tags": ["usage"],
        "summary": f"Report a batch of up to {MAX_BATCH_EVENTS:,} usage events",
        "description": "The batch is validated whole: one invalid event rejects it with 422, listing each bad "
                       "event by index in `details`, and nothing from it is stored. Events already received "
                       "(same sender, same id) count as duplicates.",
        "requestBody": _body("UsageBatch", "the events"),
        "responses": {"200": _json_response("stored and priced", _ref("UsageResult")),
                      **_errors("400", "413", "422")},
    }},
    "/organizations/{slug}/services": {
        "parameters": [SLUG],
        "get": {
            "operationId": "listServices", "tags": ["services"], "summary": "Services attached now",
            "responses": {"200": _json_response("the attached services", _object({
                "services": {"type": "array", "items": _ref("Service")}})), **_errors("404")},
        },
        "post": {
            "operationId": "attachService", "tags": ["services"],
            "summary": "Attach a recurring service (charged to the second from now)",
            "requestBody": _body("NewService", "the service"),
            "responses": {"201": _json_response("attached", _ref("Service")),
                          **_errors("400", "404", "413", "422")},
        },
    },
    "/organizations/{slug}/services/{service_id}": {
        "parameters": [SLUG, SERVICE_ID],
        "patch": {
            "operationId": "changeServiceQuantity", "tags": ["services"],
            "summary": "Change a service's quantity from now on",
            "requestBody": _body("QuantityChange", "the new quantity"),
            "responses": {"200": _json_response("the replacing attachment", _ref("ServiceReplacement")),
                          **_errors("400", "404", "409", "413", "422")},
        },
        "delete": {
            "operationId": "detachService", "tags": ["services"],
            "summary": "Detach a service (detaching twice answers the same)",
            "responses": {"200": _json_response("detached", _ref("Service")), **_errors("404")},
        },
    },
    "/organizations/{slug}/invoices/current": {
        "parameters": [SLUG],
        "get": {
            "operationId": "currentInvoice", "tags": ["invoices"], "summary": "The open invoice, with its items",
            "responses": {"200": _json_response("the open invoice", _ref("Invoice")), **_errors("404")},
        },
    },
    "/organizations/{slug}/invoices": {
        "parameters": [SLUG],
        "get": {
            "operationId": "listInvoices", "tags": ["invoices"], "summary": "Every invoice, newest first",
            "responses": {"200": _json_response("the invoices", _object({
                "invoices": {"type": "array", "items": _ref("Invoice")}})), **_errors("404")},
        },
    },
    "/invoices/{invoice_id}/sync": {
        "parameters": [INVOICE_ID],
        "post": {
            "operationId": "syncInvoice", "tags": ["sync"],
            "summary": "Queue a sync with Stripe (a sync already waiting is answered instead)",
            "responses": {"202": _json_response("queued", _ref("SyncQueued")), **_errors("404")},
        },
    },
    "/jobs/{job_id}": {
        "parameters": [JOB_ID],
        "get": {
            "operationId": "jobStatus", "tags": ["sync"], "summary": "A queued job's status",
            "responses": {"200": _json_response("the job", _ref("Job")), **_errors("404")},
        },
    },
    "/invoices/{invoice_id}/sync-runs": {
        "parameters": [INVOICE_ID],
        "get": {
            "operationId": "syncRuns", "tags": ["sync"], "summary": "The invoice's last 100 sync runs, newest first",
            "responses": {"200": _json_response("the sync runs", _object({
                "sync_runs": {"type": "array", "items": _ref("SyncRun")}})), **_errors("404")},
        },
    },
    "/openapi.json": {"get": {
        "operationId": "openapiDocument", "tags": ["meta"], "summary": "This document", "security": [],
        "responses": {"200": _json_response("the OpenAPI 3.1 document", {"type": "object"})},
    }},
    "/docs": {"get": {
        "operationId": "apiReference", "tags": ["meta"], "summary": "A readable reference built from this document",
        "security": [],
        "responses": {"200": {"description": "an HTML page", "content": {"text/html": {"schema": {
            "type": "string"}}}}},
    }},
}


@cache
def _document() -> dict:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Billing portal API",
            "version": "1",
            "description": "The JSON API for the platform's sub-systems: report usage, attach and detach services, "
                           "read invoices and sync state. JSON in and out; numbers that are money or quantities "
                           "are exact decimals (sent as text, or as JSON numbers read exactly). Every error is "
                           '`{"error": {"code", "message", "details"}}`.',
        },
        "servers": [{"url": "/api/v1"}],
        "security": [{"bearerAuth": []}],
        "paths": PATHS,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearerAuth": {
                "type": "http", "scheme": "bearer",
                "description": "a token from `PORTAL_API_TOKENS` (`TOKEN` or `SENDER:TOKEN`)"}},
        },
    }


def document() -> dict:
    """The OpenAPI 3.1 document (a fresh copy: callers may change it)."""
    return copy.deepcopy(_document())


def operations(doc: dict | None = None) -> list[dict]:
    """Every operation as {method, path, id, summary, ...}, in the document's order."""
    doc = doc or _document()
    found = []
    for path, item in doc["paths"].items():
        for method in ("get", "post", "put", "patch", "delete"):
            if method in item:
                operation = item[method]
                parameters = [*item.get("parameters", []), *operation.get("parameters", [])]
                found.append({
                    "method": method.upper(), "path": path, "id": operation["operationId"],
                    "summary": operation.get("summary", ""), "description": operation.get("description", ""),
                    "public": operation.get("security") == [],
                    "parameters": [p["name"] for p in parameters],
                    "body": _schema_name(operation.get("requestBody")),
                    "responses": {code: _response_name(response)
                                  for code, response in operation["responses"].items()},
                })
    return found


def _schema_name(body: dict | None) -> str | None:
    if not body:
        return None
    schema = next(iter(body["content"].values()))["schema"]
    return schema.get("$ref", "").rsplit("/", 1)[-1] or schema.get("type")


def _response_name(response: dict) -> str:
    content = response.get("content", {})
    if not content:
        return response["description"]
    media, body = next(iter(content.items()))
    name = body["schema"].get("$ref", "").rsplit("/", 1)[-1]
    return f"{name or media}: {response['description']}"
