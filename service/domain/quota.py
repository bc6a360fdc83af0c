"""The per-tenant bound on unfinished work (jobs, evaluations): one rule, one message, one error code."""

from __future__ import annotations

from typing import Literal

from service.domain.errors import TooManyRequests
from service.settings import Settings


def check_active_quota(active: int, settings: Settings, what: Literal["jobs", "evaluations"]) -> None:
    """429 `too_many_active_<what>` when the tenant already has the most unfinished `what` it may have.

    Args:
        active: the tenant's unfinished jobs or evaluations now (counted in the caller's transaction).
        settings: `max_active_jobs_per_tenant` is the bound for both.
        what: which kind of work is counted (names the error code and the message).
    """
    limit = settings.max_active_jobs_per_tenant
    if active >= limit:
        raise TooManyRequests(f"at most {limit} unfinished {what} per tenant", code=f"too_many_active_{what}")
