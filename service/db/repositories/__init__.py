"""Every query lives here; tenant-facing repositories filter by the tenant in their base statement."""

from service.db.repositories.backbones import BackboneRepository
from service.db.repositories.base import Page, TenantScopedRepository
from service.db.repositories.files import (
    EvaluationRepository,
    EvaluationRunRepository,
    FileRepository,
)
from service.db.repositories.jobs import (
    CheckpointRepository,
    JobEventRepository,
    JobLeaseRepository,
    JobRepository,
)
from service.db.repositories.prompts import PromptRepository
from service.db.repositories.tenants import ApiKeyRepository, TenantRepository

__all__ = [
    "ApiKeyRepository",
    "BackboneRepository",
    "CheckpointRepository",
    "EvaluationRepository",
    "EvaluationRunRepository",
    "FileRepository",
    "JobEventRepository",
    "JobLeaseRepository",
    "JobRepository",
    "Page",
    "PromptRepository",
    "TenantRepository",
    "TenantScopedRepository",
]
