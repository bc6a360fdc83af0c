"""The names the gateway and the workers agree on: Celery task names and queue names.

Light on purpose (no Celery import): the gateway's `service.queue` sends tasks by these names without
importing the worker application.
"""

from __future__ import annotations

from service.settings import Settings

#: The task that trains one job (its only argument is the job id).
TRAIN_TASK = "actprompt.train_prompt"
#: The periodic reaper task, sent only by the workers' own beat schedule.
REAP_TASK = "actprompt.reap_jobs"

#: Training queues per device kind, so CPU and GPU workers can share one broker.
GPU_QUEUE = "actprompt.gpu"
CPU_QUEUE = "actprompt.cpu"
#: The reaper's queue: consumed by the worker that runs beat (`actprompt worker --beat`), never stuck behind
#: an hour of training in a training queue.
MAINTENANCE_QUEUE = "actprompt.maintenance"


def train_queue(settings: Settings) -> str:
    """The queue training tasks are sent to and that a worker of this device consumes.

    The operator's `ACTPROMPT_JOB_QUEUE` when set, else the queue of the device kind.
    """
    if settings.job_queue:
        return settings.job_queue
    return GPU_QUEUE if settings.resolved_device() == "cuda" else CPU_QUEUE
