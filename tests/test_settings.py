"""Settings reject values that would break the service quietly, at start-up, naming the field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.settings import Settings


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("lease_seconds", 0),
        ("heartbeat_seconds", -1),
        ("max_attempts", 0),
        ("prompt_cache_pin_fraction", 1.5),
        ("rate_limit_burst", 0),
        ("serving_max_batch_rows", 0),
        ("max_upload_bytes", 0),
    ],
)
def test_out_of_range_values_are_refused(field: str, value: float) -> None:
    with pytest.raises(ValidationError, match=field):
        Settings(**{field: value})


def test_heartbeat_must_renew_the_lease_in_time() -> None:
    with pytest.raises(ValidationError, match="heartbeat_seconds"):
        Settings(lease_seconds=5, heartbeat_seconds=10)
    assert Settings(lease_seconds=6, heartbeat_seconds=1).lease_seconds == 6


def test_defaults_are_valid() -> None:
    settings = Settings()
    assert settings.heartbeat_seconds < settings.lease_seconds
    assert 0 <= settings.prompt_cache_pin_fraction <= 1
