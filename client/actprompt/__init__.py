"""actprompt: the light Python client of the actprompt API (httpx + pydantic; no torch).

from actprompt import Client
c = Client(base_url="http://127.0.0.1:8000", api_key="...")
"""

from actprompt._client import AsyncClient, Client
from actprompt._errors import (
    ActpromptError,
    APIConnectionError,
    APIError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    InternalServerError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
    UnprocessableEntityError,
)
from actprompt.states import EvaluationStatus, JobStatus
from actprompt.types import (
    ApiKey,
    ApiKeyCreated,
    Backbone,
    Evaluation,
    File,
    Job,
    JobEvent,
    Prediction,
    Progress,
    Prompt,
    Tenant,
    TenantCreated,
)

__version__ = "0.1.0"

__all__ = [
    "APIConnectionError",
    "APIError",
    "ActpromptError",
    "ApiKey",
    "ApiKeyCreated",
    "AsyncClient",
    "AuthenticationError",
    "Backbone",
    "BadRequestError",
    "Client",
    "ConflictError",
    "Evaluation",
    "EvaluationStatus",
    "File",
    "InternalServerError",
    "Job",
    "JobEvent",
    "JobStatus",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "Prediction",
    "Progress",
    "Prompt",
    "RateLimitError",
    "ServiceUnavailableError",
    "Tenant",
    "TenantCreated",
    "UnprocessableEntityError",
]
