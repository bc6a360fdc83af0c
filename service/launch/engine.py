"""The engine process's main: the database as the prompt source, an EngineCore, and its ZeroMQ server.

The engine reads artifacts by internal key straight from the prompts table (it is a process of the
service, with the same database URL); resolving and authorising tenants' ids stays in the fronts. After a
restart nothing needs reloading by hand: backbones load on their first request and prompts on their first
miss, from the database.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import threading
import time
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from service.domain.errors import NotFound
from service.domain.prompts import load_artifact_bytes
from service.processes import pid_alive
from service.serving.errors import PromptNotFoundError

log = logging.getLogger("actprompt.engine")

__all__ = ["DatabasePromptSource", "engine_main"]


class DatabasePromptSource:
    """Loads an artifact by internal key from the prompts table; checks the bytes are the ones named."""

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self._factory = session_factory

    def _read(self, key: str) -> bytes:
        row_key, _, sha = key.partition(":")
        try:
            with self._factory() as session:
                data = load_artifact_bytes(session, int(row_key))
        except NotFound:
            raise PromptNotFoundError(f"prompt {key!r} was deleted") from None
        if sha and hashlib.sha256(data).hexdigest() != sha:  # the row now holds another artifact
            raise PromptNotFoundError(f"prompt {key!r} was replaced")
        return data

    async def load(self, key: str) -> bytes:
        return await asyncio.to_thread(self._read, key)


def engine_main(
    endpoint: str, ready: Any = None, torch_threads: int = 0, supervisor_pid: int | None = None
) -> None:
    """Run the engine until SIGTERM (the supervisor's stop) or until its supervisor is gone; SIGINT is left
    to the supervisor, which stops the fronts first so that their requests in flight still get answers.

    ``ready``: a multiprocessing Event set once the socket is bound. ``supervisor_pid``: the `serve`
    process (the engine's own parent is the fork server it was forked from); default: the parent.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    t0 = time.monotonic()
    _exit_with_supervisor(supervisor_pid or os.getppid())
    import torch

    from service.db.session import make_engine, make_session_factory
    from service.launch.front import serving_config
    from service.launch.heap import freeze_startup_heap
    from service.log import configure_logging
    from service.serving.core import EngineCore
    from service.serving.engine_server import EngineServer
    from service.settings import get_settings

    settings = get_settings()
    configure_logging(settings.log_level, json_lines=settings.log_json)
    cores = torch_threads or settings.torch_threads or os.cpu_count() or 1
    config = serving_config(settings, cores=cores)
    torch.set_num_threads(max(1, cores // config.model_lanes))  # the cores, shared by the lanes
    db = make_engine(settings.database_url)
    core = EngineCore(DatabasePromptSource(make_session_factory(db)), config)

    def on_ready() -> None:
        frozen = freeze_startup_heap()  # start-up is done: its objects leave the collector's walk
        log.info(
            "engine process %d ready in %.2f s on %s (%d objects frozen)",
            os.getpid(),
            time.monotonic() - t0,
            endpoint,
            frozen,
        )
        if ready is not None:
            ready.set()

    try:
        asyncio.run(EngineServer(core, endpoint).serve(on_ready=on_ready))
    finally:
        db.dispose()


def _exit_with_supervisor(pid: int) -> None:
    """An engine whose supervisor was killed (SIGKILL leaves no chance to stop it) stops too."""
    parent = os.getppid()

    def alive() -> bool:
        if pid == parent and os.getppid() != parent:  # re-parented: the parent died
            return False
        return pid_alive(pid)

    def watch() -> None:
        while alive():
            time.sleep(0.5)
        log.warning("engine: the serve process %d is gone; stopping", pid)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="supervisor-watch").start()
