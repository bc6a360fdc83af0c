"""Job and evaluation states: the one list the API schemas, the database, the client and the console use.

It lives in the light client because the server depends on the client, not the other way round; the
console reads it through `GET /console/static/states.js`.
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    """A training job's state; `validating` lasts until a worker has loaded and checked the dataset."""

    VALIDATING = "validating"
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


#: States a job can still leave (a worker may hold it, or will).
ACTIVE_JOB_STATES = frozenset(
    {JobStatus.VALIDATING, JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.CANCELLING}
)
#: States a job never leaves.
TERMINAL_JOB_STATES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class EvaluationStatus(StrEnum):
    """An evaluation's state; `queued` and `running` ones are owned by one API process."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


ACTIVE_EVALUATION_STATES = frozenset({EvaluationStatus.QUEUED, EvaluationStatus.RUNNING})
TERMINAL_EVALUATION_STATES = frozenset({EvaluationStatus.SUCCEEDED, EvaluationStatus.FAILED})
