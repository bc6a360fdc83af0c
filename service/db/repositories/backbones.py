"""Backbones are shared by every tenant: this repository is global."""

from __future__ import annotations

from actprompt.states import ACTIVE_JOB_STATES
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.db.models import Backbone, Job, Prompt


class BackboneRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, backbone: Backbone) -> Backbone:
        self.session.add(backbone)
        self.session.flush()
        return backbone

    def get(self, backbone_id: str) -> Backbone | None:
        return self.session.get(Backbone, backbone_id)

    def list_all(self) -> list[Backbone]:
        return list(self.session.scalars(select(Backbone).order_by(Backbone.id)))

    def find_by_spec_hash(self, spec_hash: str) -> list[Backbone]:
        return list(self.session.scalars(select(Backbone).where(Backbone.spec_hash == spec_hash)))

    def count_users(self, backbone_id: str) -> tuple[int, int]:
        """(prompts, active jobs) that use the backbone, across all tenants."""
        prompts = self.session.scalar(select(func.count()).where(Prompt.backbone_id == backbone_id)) or 0
        jobs = (
            self.session.scalar(
                select(func.count()).where(Job.backbone_id == backbone_id, Job.status.in_(ACTIVE_JOB_STATES))
            )
            or 0
        )
        return int(prompts), int(jobs)

    def delete(self, backbone: Backbone) -> None:
        self.session.delete(backbone)
        self.session.flush()
