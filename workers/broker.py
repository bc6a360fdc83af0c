"""What the broker still holds: lets the reaper tell a job that waits its turn from a job the broker lost.

The reaper re-sends a job that has been `queued` in the database for `Settings.queued_stale_seconds`. On
its own that cannot tell "Redis lost the message" (FLUSHALL, a restart without persistence) from "the
message is there, behind an hour of other jobs"; re-sending the latter only piles up duplicates and, after
`max_requeues`, fails a job that was merely waiting. `BrokerJobQueue.waiting_job_ids()` reads the ready
lists of the training queue, so the reaper re-sends only what is really missing.

Messages reserved by a worker (Redis's `unacked` hash) are deliberately not counted: with prefetch 1 a live
worker reserves only the job it is running, so a job still `queued` in the database whose message sits
there belongs to a worker that died before claiming it; that message comes back only after the visibility
timeout, so it must be re-sent.
"""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

from kombu import Connection

from service.queue import CeleryQueue
from workers.queues import TRAIN_TASK

log = logging.getLogger("actprompt.workers.broker")


def _job_id_of(raw: bytes | str) -> str | None:
    """The job id a Celery (protocol 2) message in a kombu Redis list carries, or None if not a train task."""
    try:
        message = json.loads(raw)
        if message.get("headers", {}).get("task") != TRAIN_TASK:
            return None
        body: Any = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return str(args[0]) if args else None
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def _ready_lists(channel: Any, queue: str) -> set[str]:
    """The Redis lists that hold `queue`'s ready messages.

    kombu's Redis transport emulates priorities with one list per priority step (its public
    `priority_steps`): the queue's own name for step 0, and the name, the channel's `sep` and the step for
    the others.
    """
    return {queue, *(f"{queue}{channel.sep}{step}" for step in channel.priority_steps if step)}


class BrokerJobQueue:
    """The reaper's queue: sends like the gateway's `CeleryQueue`, and can list the jobs waiting in Redis."""

    def __init__(self, broker_url: str, queue_name: str) -> None:
        self.broker_url = broker_url
        self.queue_name = queue_name
        self._sender = CeleryQueue(broker_url, queue_name)

    def enqueue(self, job_id: str) -> None:
        self._sender.enqueue(job_id)

    def ping(self) -> bool:
        return self._sender.ping()

    def close(self) -> None:
        self._sender.close()

    def waiting_job_ids(self) -> set[str]:
        """Job ids with a message in the ready lists of the training queue (every priority sub-list)."""
        found: set[str] = set()
        with Connection(self.broker_url, connect_timeout=5) as connection:
            channel: Any = connection.default_channel
            client = channel.client
            for key in sorted(_ready_lists(channel, self.queue_name)):
                for raw in client.lrange(key, 0, -1):
                    job_id = _job_id_of(raw)
                    if job_id is not None:
                        found.add(job_id)
        return found
