"""The one table from error class to HTTP status: every error class has a status (its own
or its nearest listed base's), the service's own errors have the status their meaning
says, and error_class_for_code turns every stable code back into its class."""

from __future__ import annotations

from tests.core.test_error_table import GOLDEN, defined_errors

from anyhsm import errors as e
from anyhsm.errors import error_class_for_code
from anyhsm.service.status import STATUS, retry_after, status_for


def test_every_error_class_has_a_status_in_range() -> None:
    for name, cls in defined_errors().items():
        status = status_for(cls.__new__(cls))
        assert 400 <= status <= 599, name


def test_the_service_errors_have_their_statuses() -> None:
    expected = {
        e.Unauthenticated: 401,
        e.Forbidden: 403,
        e.InvalidRequest: 400,
        e.RequestTooLarge: 413,
        e.EndpointNotFound: 404,
        e.MethodNotAllowed: 405,
        e.IdempotencyConflict: 422,
        e.RateLimited: 429,
        e.ServiceBusy: 503,
        e.RequestTimedOut: 504,
        e.KeyNotFound: 404,
        e.KeyNotInDirectory: 404,
        e.InvalidDigest: 400,
        e.PsbtError: 400,
        e.PsbtLimitExceeded: 413,
        e.SigningPolicyError: 403,
        e.NothingSigned: 422,
        e.ProviderUnavailable: 503,
        e.AllProvidersFailed: 503,
        e.AuditWriteFailed: 503,
        e.KeystoreTampered: 500,
        e.UnsupportedOperation: 422,
    }
    for cls, status in expected.items():
        assert status_for(cls.__new__(cls)) == status, cls.__name__
    assert set(STATUS) <= set(defined_errors().values())


def test_retry_after_only_for_429_and_503() -> None:
    busy = e.ServiceBusy("busy", retry_after=2.4)
    assert retry_after(busy, 503) == 2
    assert retry_after(e.RateLimited("slow", retry_after=0.01), 429) == 1
    assert retry_after(e.ProviderUnavailable("down"), 503) == 1
    assert retry_after(e.KeyNotFound("no"), 404) is None


def test_every_code_maps_back_to_its_class() -> None:
    classes = defined_errors()
    for name, (code, _) in GOLDEN.items():
        assert error_class_for_code(code) is classes[name], code
    assert error_class_for_code("a_code_from_a_newer_version") is e.HsmError
