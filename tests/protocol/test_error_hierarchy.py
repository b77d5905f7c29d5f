"""The exception hierarchy (protocol/errors.py): codes and the fields error frames carry."""

from __future__ import annotations

import pytest

from protocol import errors


def test_every_error_is_a_rapport_error_with_a_code() -> None:
    for cls in (errors.BadRequest, errors.Unauthorized, errors.NotFound, errors.TurnInProgress,
                errors.RateLimited, errors.Busy, errors.TooLarge, errors.ResumeExpired,
                errors.Unavailable, errors.EngineError, errors.IllegalTransition):
        assert issubclass(cls, errors.RapportError)
        assert isinstance(cls.code, str) and cls.code


def test_unavailable_always_says_when_to_retry() -> None:
    assert errors.Unavailable("the engine is away").fields == {"retry_after_ms": 1000}
    assert errors.Unavailable("later", retry_after_ms=2500).fields == {"retry_after_ms": 2500}


@pytest.mark.parametrize("fields", [{"turn_id": None}, {}])
def test_fields_left_out_when_none(fields: dict[str, object]) -> None:
    assert errors.BadRequest("x", **fields).fields == {}
