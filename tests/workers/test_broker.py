"""The broker facts the reaper relies on, against the real Redis (no worker processes: fast).

* `BrokerJobQueue.waiting_job_ids()` sees exactly the jobs whose messages wait in the training queue.
* After a flush (which also deletes kombu's exchange -> queue bindings), a producer created before the flush
  still delivers: Celery publishes to a direct queue through the anonymous exchange, straight to the list,
  so the gateway needs no restart after Redis lost its data.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
import redis

from service.queue import CeleryQueue
from tests.services import forget_queues
from tests.workers.conftest import REDIS_URL

pytestmark = pytest.mark.redis


@pytest.fixture
def queue_name(redis_client: redis.Redis) -> Iterator[str]:
    name = f"actprompt.test.{secrets.token_hex(4)}.cpu"
    yield name
    for key in redis_client.scan_iter(match=f"*{name}*"):
        redis_client.delete(key)


def test_waiting_job_ids_lists_the_messages_in_the_queue(redis_client: redis.Redis, queue_name: str) -> None:
    from workers.broker import BrokerJobQueue

    sender = CeleryQueue(REDIS_URL, queue_name)
    probe = BrokerJobQueue(REDIS_URL, queue_name)
    try:
        assert probe.waiting_job_ids() == set()
        sender.enqueue("job_a")
        sender.enqueue("job_b")
        sender.enqueue("job_a")
        assert probe.waiting_job_ids() == {"job_a", "job_b"}
        redis_client.rpop(queue_name)  # a worker took the oldest message (kombu pushes left, pops right)
        assert probe.waiting_job_ids() == {"job_a", "job_b"}
        redis_client.delete(queue_name)
        assert probe.waiting_job_ids() == set()
    finally:
        sender.close()
        probe.close()


def test_sends_still_arrive_after_a_flush(redis_client: redis.Redis, queue_name: str) -> None:
    from workers.broker import BrokerJobQueue

    sender = CeleryQueue(REDIS_URL, queue_name)  # like the gateway: one long-lived producer
    probe = BrokerJobQueue(REDIS_URL, queue_name)
    try:
        sender.enqueue("job_before")
        assert probe.waiting_job_ids() == {"job_before"}
        assert forget_queues(redis_client, queue_name) > 0  # a flush of our queue only: others share this DB
        assert probe.waiting_job_ids() == set()
        sender.enqueue("job_after")
        assert probe.waiting_job_ids() == {"job_after"}
    finally:
        sender.close()
        probe.close()


def test_waiting_job_ids_reads_every_priority_list(redis_client: redis.Redis, queue_name: str) -> None:
    """kombu keeps a prioritised message in a list of its own: the reaper must see it there too."""
    import celery

    from workers.broker import BrokerJobQueue
    from workers.queues import TRAIN_TASK

    app = celery.Celery("probe", broker=REDIS_URL, set_as_current=False)
    probe = BrokerJobQueue(REDIS_URL, queue_name)
    try:
        app.send_task(TRAIN_TASK, args=["job_low"], queue=queue_name)
        app.send_task(TRAIN_TASK, args=["job_high"], queue=queue_name, priority=9)
        assert len(list(redis_client.scan_iter(match=f"{queue_name}*"))) == 2  # two lists, one per priority
        assert probe.waiting_job_ids() == {"job_low", "job_high"}
    finally:
        app.close()
        probe.close()
