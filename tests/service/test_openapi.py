"""The committed OpenAPI document is what the server does: the same paths and methods as
the routes (anyhsm.service.routes.ENDPOINTS), each operation naming the right a client
needs, the idempotent ones declaring Idempotency-Key, the public ones no security; the
server serves exactly the committed bytes. (Every answer the tests receive is also
validated against it: tests/service/conftest.py.)"""

from __future__ import annotations

import json

import jsonschema
from tests.service.conftest import Running

from anyhsm.service.openapi import document, document_bytes
from anyhsm.service.routes import ENDPOINTS


def test_the_document_is_valid_openapi_3_1_json_schema() -> None:
    doc = document()
    assert doc["openapi"] == "3.1.0"
    for schema in doc["components"]["schemas"].values():  # type: ignore[index, union-attr]
        jsonschema.Draft202012Validator.check_schema(schema)


def test_paths_and_methods_are_the_routes() -> None:
    doc = document()
    declared = {
        (method.upper(), path)
        for path, ops in doc["paths"].items()  # type: ignore[union-attr]
        for method in ops
    }
    assert declared == {(e.method, e.path) for e in ENDPOINTS}
    for e in ENDPOINTS:
        op = doc["paths"][e.path][e.method.lower()]  # type: ignore[index]
        assert op["x-anyhsm-op"] == (e.op.value if e.op is not None else None), e.path
        public = op.get("security") == []
        assert public == (e.op is None), e.path
        headers = {p["name"] for p in op.get("parameters", []) if p["in"] == "header"}
        assert ("Idempotency-Key" in headers) == e.idempotent, e.path
        path_params = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
        assert path_params == ({"key"} if "{key}" in e.path else set()), e.path


def test_the_server_serves_the_committed_document(service: Running) -> None:
    status, body, _headers = service.client(None).request("GET", "/openapi.json")
    assert status == 200 and body == document_bytes()
    assert json.loads(body) == document()
