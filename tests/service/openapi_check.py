"""Checking answers against the committed OpenAPI document (JSON Schema 2020-12).

:func:`check_response` finds the operation of a request (method and path, matched against
the document's path templates), the response declared for its status (an undeclared
status is a failure), and validates the JSON body against its schema. The service tests
run every answer the client receives through it (tests/service/conftest.py)."""

from __future__ import annotations

import json
import re
from functools import cache

import jsonschema

from anyhsm.service.openapi import document


@cache
def _templates() -> list[tuple[re.Pattern[str], str]]:
    out = []
    for path in document()["paths"]:  # type: ignore[union-attr]
        pattern = re.sub(r"\\\{[a-z_]+\\\}", "[^/]+", re.escape(path))
        out.append((re.compile(pattern + r"\Z"), path))
    return out


def template_of(path: str) -> str | None:
    path = path.split("?", 1)[0]
    for pattern, template in _templates():
        if pattern.match(path):
            return template
    return None


def _resolve(obj: dict[str, object]) -> dict[str, object]:
    ref = obj.get("$ref")
    if not isinstance(ref, str):
        return obj
    node: object = document()
    for part in ref.removeprefix("#/").split("/"):
        assert isinstance(node, dict)
        node = node[part]
    assert isinstance(node, dict)
    return node


def check_response(method: str, path: str, status: int, body: bytes, content_type: str) -> None:
    template = template_of(path)
    assert template is not None, f"{path} is not in the OpenAPI document"
    doc = document()
    op = doc["paths"][template].get(method.lower())  # type: ignore[index]
    if op is None:  # a method the endpoint does not have: the generic error answer
        assert status == 405, (method, path, status)
        _validate_error(body)
        return
    responses = op["responses"]
    declared = responses.get(str(status))
    assert declared is not None, f"{method} {template}: status {status} is not declared"
    declared = _resolve(declared)
    content = declared.get("content", {})
    assert isinstance(content, dict)
    if "application/json" in content:
        assert content_type.startswith("application/json"), (template, content_type)
        schema = content["application/json"]["schema"]
        obj = json.loads(body)
        jsonschema.Draft202012Validator(
            {**schema, "components": doc["components"]},
            format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
        ).validate(obj)
    else:
        assert "text/plain" in content and content_type.startswith("text/plain"), content_type


def _validate_error(body: bytes) -> None:
    doc = document()
    jsonschema.Draft202012Validator(
        {"$ref": "#/components/schemas/Error", "components": doc["components"]}
    ).validate(json.loads(body))
