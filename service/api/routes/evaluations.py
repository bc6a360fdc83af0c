"""Evaluations: score a prompt on a labelled dataset through the serving path; get and list the results."""

from __future__ import annotations

from actprompt.states import EvaluationStatus
from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from service.api.deps import PageDep, ReadTenantDep, SessionDep, SettingsDep, TrainTenantDep
from service.api.routing import CheckedRoute
from service.api.schemas.common import ERROR_RESPONSES, ListPublic
from service.api.schemas.evaluations import EvaluationCreate, EvaluationPublic
from service.db.models import Evaluation
from service.domain import evaluations
from service.domain.evaluation_runner import EvaluationRunner

router = APIRouter(route_class=CheckedRoute, tags=["evaluations"], responses=ERROR_RESPONSES)


def evaluation_public(e: Evaluation) -> EvaluationPublic:
    return EvaluationPublic.model_validate(e)


@router.post("/v1/evaluations", status_code=202, response_model=EvaluationPublic)
async def create_evaluation(
    body: EvaluationCreate,
    request: Request,
    tenant_id: TrainTenantDep,
    session: SessionDep,
    settings: SettingsDep,
) -> EvaluationPublic:
    def create() -> tuple[EvaluationPublic, evaluations.prompts.PromptHandle]:
        row, handle = evaluations.create_evaluation(
            session, tenant_id, body.prompt, body.dataset_uri, settings
        )
        session.commit()
        return evaluation_public(row), handle

    public, handle = await run_in_threadpool(create)
    runner: EvaluationRunner = request.app.state.evaluations
    runner.submit(public.id, handle)  # after the commit: the runner must find the row
    return public


@router.get("/v1/evaluations", response_model=ListPublic[EvaluationPublic])
def list_evaluations(
    tenant_id: ReadTenantDep,
    session: SessionDep,
    page: PageDep,
    status: EvaluationStatus | None = Query(None),
) -> ListPublic[EvaluationPublic]:
    rows = evaluations.list_evaluations(session, tenant_id, limit=page.fetch, after=page.after, status=status)
    return page.answer(rows, lambda e: e.id, evaluation_public)


@router.get("/v1/evaluations/{evaluation_id}", response_model=EvaluationPublic)
def get_evaluation(evaluation_id: str, tenant_id: ReadTenantDep, session: SessionDep) -> EvaluationPublic:
    return evaluation_public(evaluations.get_evaluation(session, tenant_id, evaluation_id))
