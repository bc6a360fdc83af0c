"""Evaluations: a prompt version scored on a labelled dataset (submission, reads, scores, orphan sweep).

The scoring itself runs in the API process, through the predictor (`evaluation_runner`); here are the
rules that do not need a model: what may be submitted, how labels map onto the prompt's classes, and how
top-1/top-5, per-class accuracy and the confusion matrix are counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session

from service.db.base import utcnow
from service.db.ids import new_id
from service.db.models import Evaluation
from service.db.repositories import EvaluationRepository, EvaluationRunRepository
from service.domain import prompts
from service.domain.errors import InvalidInput, found
from service.domain.jobs import check_dataset
from service.domain.quota import check_active_quota
from service.settings import Settings

#: Above this many classes the dense confusion matrix is replaced by its non-zero cells.
DENSE_CONFUSION_MAX_CLASSES = 200


def create_evaluation(
    session: Session, tenant_id: str, prompt_ref: str, dataset_uri: str, settings: Settings
) -> tuple[Evaluation, prompts.PromptHandle]:
    """Check and insert a `queued` evaluation (not committed); `prm_x` pins the latest version now."""
    handle = prompts.resolve_for_predict(session, tenant_id, prompt_ref)
    check_dataset(session, tenant_id, dataset_uri, settings)
    repo = EvaluationRepository(session, tenant_id)
    check_active_quota(repo.count_active(), settings, "evaluations")
    now = utcnow()
    row = Evaluation(
        id=new_id("eval"),
        tenant_id=tenant_id,
        status="queued",
        prompt_id=handle.prompt_id,
        prompt_version=handle.version,
        dataset_uri=dataset_uri,
        created_at=now,
        updated_at=now,
        heartbeat_at=now,
    )
    return repo.add(row), handle


def get_evaluation(session: Session, tenant_id: str, evaluation_id: str) -> Evaluation:
    row = EvaluationRepository(session, tenant_id).get(evaluation_id)
    return found(row, "evaluation", evaluation_id, param="evaluation_id")


def list_evaluations(
    session: Session, tenant_id: str, *, limit: int, after: str | None, status: str | None
) -> list[Evaluation]:
    return EvaluationRepository(session, tenant_id).list(limit=limit, after=after, status=status)


def fail_orphans(session: Session, settings: Settings) -> int:
    """Evaluations whose API process stopped renewing them (crashed, killed) end `failed`, with the reason.

    A live process renews every `heartbeat_seconds`, so only one silent for a whole lease is swept; called
    at start-up and on every read, nothing stays `running` forever.
    """
    now = utcnow()
    error = {
        "code": "evaluation_interrupted",
        "message": "the API process running this evaluation stopped; create the evaluation again",
    }
    return EvaluationRunRepository(session).fail_stale(
        now - timedelta(seconds=settings.lease_seconds), error, now
    )


def label_map(dataset_classes: Sequence[str], prompt_classes: Sequence[str]) -> list[int]:
    """Dataset label → the prompt's class index, by name; every dataset class must be one the prompt knows."""
    index = {str(c): i for i, c in enumerate(prompt_classes)}
    unknown = [str(c) for c in dataset_classes if str(c) not in index]
    if unknown:
        shown = ", ".join(unknown[:10]) + (f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else "")
        raise InvalidInput(
            f"the dataset has classes the prompt does not know: {shown}",
            code="class_mismatch",
            param="dataset_uri",
        )
    return [index[str(c)] for c in dataset_classes]


def score(labels: Sequence[int], top5: Sequence[Sequence[int]], classes: Sequence[str]) -> dict[str, Any]:
    """top-1, top-5, per-class accuracy and the confusion matrix (rows: true class, columns: predicted).

    `labels[i]` and `top5[i]` are indices into the prompt's `classes`; `top5[i][0]` is the top-1 guess.
    """
    n, k = len(labels), len(classes)
    if n == 0:
        raise InvalidInput("the dataset has no images to score", code="empty_dataset", param="dataset_uri")
    top1_hits = sum(int(row[0] == y) for y, row in zip(labels, top5, strict=True))
    top5_hits = sum(int(y in row[:5]) for y, row in zip(labels, top5, strict=True))
    cells: dict[tuple[int, int], int] = {}
    for y, row in zip(labels, top5, strict=True):
        cells[(y, row[0])] = cells.get((y, row[0]), 0) + 1
    support = {c: 0 for c in range(k)}
    for y in labels:
        support[y] += 1
    per_class = {
        str(classes[c]): {"support": support[c], "accuracy": cells.get((c, c), 0) / support[c]}
        for c in range(k)
        if support[c]
    }
    out: dict[str, Any] = {
        "num_images": n,
        "top1": top1_hits / n,
        "top5": top5_hits / n,
        "classes": [str(c) for c in classes],
        "per_class": per_class,
    }
    if k <= DENSE_CONFUSION_MAX_CLASSES:
        out["confusion_matrix"] = [[cells.get((t, p), 0) for p in range(k)] for t in range(k)]
    else:
        out["confusion"] = [[t, p, c] for (t, p), c in sorted(cells.items())]
    return out
