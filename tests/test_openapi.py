"""The OpenAPI document: it describes exactly the `api` blueprint's routes, it is
valid OpenAPI 3.1, and it is served (with its reference page) without a token."""
from __future__ import annotations

import re

from openapi_spec_validator import validate
from openapi_spec_validator.versions.shortcuts import get_spec_version

from portal.api.openapi import document

PREFIX = "/api/v1"
AUTOMATIC = {"HEAD", "OPTIONS"}  # Flask adds these to every rule


def blueprint_operations(app) -> set[tuple[str, str]]:
    """(METHOD, /path/{param}) of every rule of the `api` blueprint."""
    found = set()
    for rule in app.url_map.iter_rules():
        if not rule.endpoint.startswith("api."):
            continue
        assert rule.rule.startswith(PREFIX), rule.rule
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule[len(PREFIX):])
        found.update((method, path) for method in rule.methods - AUTOMATIC)
    return found


def document_operations(doc: dict) -> set[tuple[str, str]]:
    methods = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
    return {(method.upper(), path) for path, item in doc["paths"].items() for method in item if method in methods}


def test_every_api_route_is_in_the_document_and_nothing_else(app):
    routes = blueprint_operations(app)
    described = document_operations(document())
    assert len(routes) >= 14
    assert routes - described == set(), "routes missing from portal/api/openapi.py"
    assert described - routes == set(), "operations in the document that no route serves"


def test_path_parameters_match_the_routes(app):
    for path, item in document()["paths"].items():
        declared = {p["name"] for p in item.get("parameters", []) if p["in"] == "path"}
        for method in item:
            if method == "parameters":
                continue
            declared_here = declared | {p["name"] for p in item[method].get("parameters", []) if p["in"] == "path"}
            assert declared_here == set(re.findall(r"{([^}]+)}", path)), (method, path)


def test_the_document_is_valid_openapi_3_1():
    doc = document()
    assert get_spec_version(doc).major == "3" and get_spec_version(doc).minor == "1"
    validate(doc)


def test_every_operation_documents_its_errors_in_the_contract_shape():
    doc = document()
    error = doc["components"]["schemas"]["Error"]
    assert error["required"] == ["error"]
    assert error["properties"]["error"]["required"] == ["code", "message", "details"]
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        **doc["components"]["securitySchemes"]["bearerAuth"], "type": "http", "scheme": "bearer"}
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            if operation.get("security") == []:
                continue  # the public description itself
            assert "401" in operation["responses"], (method, path)
            for code, response in operation["responses"].items():
                if code.startswith(("4", "5")):
                    assert response["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/Error"}, (method, path, code)


def test_document_and_reference_are_served_without_a_token(client):
    response = client.get("/api/v1/openapi.json")
    assert response.status_code == 200 and response.is_json
    assert response.get_json() == document()
    page = client.get("/api/v1/docs")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert "<script" not in html and "//cdn" not in html and "https://" not in html
    for method, path in document_operations(document()):
        assert f"{method}</span> <code>{PREFIX}{path}</code>" in html, (method, path)
    # Nothing else became public.
    assert client.get("/api/v1/products").status_code == 401
    assert client.get("/api/v1/docs", headers={"Authorization": "Bearer wrong"}).status_code == 200
