"""The OpenAPI 3.1 document of the service, committed beside this module
(``openapi.json``) and served at ``GET /openapi.json``. tests/service/test_openapi.py
keeps its paths equal to :data:`anyhsm.service.routes.ENDPOINTS` and validates the
service's answers against its schemas."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources


@cache
def document_bytes() -> bytes:
    return resources.files("anyhsm.service").joinpath("openapi.json").read_bytes()


def document() -> dict[str, object]:
    doc = json.loads(document_bytes())
    assert isinstance(doc, dict)
    return doc
