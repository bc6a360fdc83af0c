"""The evaluation runner: scores a prompt on a labelled dataset in the API process, through the predictor.

Scoring a prompt on a labelled dataset is exactly what serving does, so it goes through the same predictor
that answers /v1/predict: the numbers are the ones traffic would get. One evaluation at a time per process
(a semaphore), in chunks, so predict traffic interleaves with it. The running evaluation renews its
heartbeat; a sweep (at start-up and every lease period) fails evaluations nobody renews any more, so one
left `running` by a crashed process ends `failed` with a reason instead of staying running forever.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Collection
from typing import Any

import numpy as np
from actprompt.states import ACTIVE_EVALUATION_STATES, EvaluationStatus
from sqlalchemy.orm import Session, sessionmaker

from service.db.base import utcnow
from service.db.repositories import EvaluationRunRepository
from service.domain import evaluations
from service.domain.datasets import resolve_dataset
from service.domain.errors import InvalidInput
from service.domain.predict import Predictor
from service.domain.prompts import PromptHandle
from service.engine.errors import ActpromptError
from service.settings import Settings
from service.storage import Storage

log = logging.getLogger("actprompt.evaluations")

#: Images per call into the predictor: big enough to fill batches, small enough to let traffic through.
CHUNK_IMAGES = 256


class EvaluationRunner:
    def __init__(
        self,
        session_factory: sessionmaker[Session],
        predictor: Predictor,
        storage: Storage,
        settings: Settings,
    ) -> None:
        self._factory = session_factory
        self._predictor = predictor
        self._storage = storage
        self._settings = settings
        self._tasks: set[asyncio.Task[None]] = set()
        self._one_at_a_time = asyncio.Semaphore(1)
        self.runner_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._sweeper: asyncio.Task[None] | None = None

    # --- lifecycle ------------------------------------------------------------------------------------
    def fail_orphans(self) -> int:
        with self._factory() as session:
            n = evaluations.fail_orphans(session, self._settings)
            session.commit()
        if n:
            log.warning("evaluations left by a stopped process marked failed", extra={"count": n})
        return n

    def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self._settings.lease_seconds / 2)
            try:
                await asyncio.to_thread(self.fail_orphans)
            except Exception:
                log.warning("evaluation sweep failed", exc_info=True)

    async def aclose(self) -> None:
        tasks = [*self._tasks, *([self._sweeper] if self._sweeper else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def submit(self, evaluation_id: str, handle: PromptHandle) -> None:
        """Call after the row committed; the evaluation runs in a background task of this process."""
        task = asyncio.create_task(self._run(evaluation_id, handle), name=f"evaluation-{evaluation_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- one evaluation -------------------------------------------------------------------------------
    def _update(self, evaluation_id: str, statuses: Collection[EvaluationStatus], **values: Any) -> bool:
        with self._factory() as session:
            ok = EvaluationRunRepository(session).update_if(
                evaluation_id, statuses, updated_at=utcnow(), **values
            )
            session.commit()
            return ok

    async def _heartbeat(self, evaluation_id: str) -> None:
        while True:
            await asyncio.sleep(self._settings.heartbeat_seconds)
            await asyncio.to_thread(
                self._update, evaluation_id, ACTIVE_EVALUATION_STATES, heartbeat_at=utcnow()
            )

    async def _run(self, evaluation_id: str, handle: PromptHandle) -> None:
        heartbeat = asyncio.create_task(self._heartbeat(evaluation_id))
        try:
            async with self._one_at_a_time:
                now = utcnow()
                claimed = await asyncio.to_thread(
                    self._update,
                    evaluation_id,
                    (EvaluationStatus.QUEUED,),
                    status=EvaluationStatus.RUNNING,
                    runner_id=self.runner_id,
                    started_at=now,
                    heartbeat_at=now,
                )
                if not claimed:
                    return
                metrics = await self._score(evaluation_id, handle)
            await asyncio.to_thread(
                self._update,
                evaluation_id,
                (EvaluationStatus.RUNNING,),
                status=EvaluationStatus.SUCCEEDED,
                metrics=metrics,
                finished_at=utcnow(),
            )
            log.info("evaluation succeeded", extra={"evaluation_id": evaluation_id, "top1": metrics["top1"]})
        except asyncio.CancelledError:  # the process is stopping: say so rather than leave it running
            await asyncio.to_thread(self._fail, evaluation_id, "evaluation_interrupted", "the API stopped")
            raise
        except ActpromptError as exc:  # a bad dataset, or the object store down (code storage_unavailable)
            code = str(getattr(exc, "code", "invalid_value"))
            await asyncio.to_thread(self._fail, evaluation_id, code, getattr(exc, "message", str(exc)))
        except Exception as exc:
            log.exception("evaluation crashed", extra={"evaluation_id": evaluation_id})
            await asyncio.to_thread(
                self._fail, evaluation_id, "internal_error", f"{type(exc).__name__}: {exc}"
            )
        finally:
            heartbeat.cancel()

    def _fail(self, evaluation_id: str, code: str, message: str) -> None:
        self._update(
            evaluation_id,
            ACTIVE_EVALUATION_STATES,
            status=EvaluationStatus.FAILED,
            error={"code": code, "message": message or code},
            finished_at=utcnow(),
        )

    def _load(self, tenant_id: str, uri: str, handle: PromptHandle) -> tuple[list[Any], list[int]]:
        """Images and labels (as the prompt's class indices): the test split if there is one, else all."""
        from service.engine.data import load_dataset

        path = resolve_dataset(self._factory, tenant_id, uri, self._settings, self._storage)
        dataset = load_dataset(path, min_images_per_class=1)
        splits = [dataset.test] if dataset.test is not None else [dataset.train, dataset.val]
        mapping = evaluations.label_map(dataset.classes, handle.classes)
        images: list[Any] = []
        labels: list[int] = []
        for split in splits:
            if split is None:
                continue
            images.extend(split.images[i] for i in range(len(split)))
            labels.extend(mapping[int(y)] for y in np.asarray(split.labels).tolist())
        if len(images) > self._settings.max_evaluation_images:
            raise InvalidInput(
                f"the dataset has {len(images)} images; an evaluation scores at most "
                f"{self._settings.max_evaluation_images}",
                code="dataset_too_large",
                param="dataset_uri",
            )
        return images, labels

    async def _score(self, evaluation_id: str, handle: PromptHandle) -> dict[str, Any]:
        with self._factory() as session:
            row = EvaluationRunRepository(session).get(evaluation_id)
            assert row is not None
            tenant_id, uri = row.tenant_id, row.dataset_uri
        images, labels = await asyncio.to_thread(self._load, tenant_id, uri, handle)
        top5: list[list[int]] = []
        for start in range(0, len(images), CHUNK_IMAGES):
            chunk = images[start : start + CHUNK_IMAGES]
            (rows,) = await self._predictor.predict_many([handle], chunk, 5, tenant_id=tenant_id)
            top5.extend([p.index for p in row] for row in rows)
        return evaluations.score(labels, top5, handle.classes)
