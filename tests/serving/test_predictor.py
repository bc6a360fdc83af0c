"""The serving path below HTTP: real ResNet-20, real artifacts, the batcher and both cache tiers."""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from bench.synthetic import random_lora_artifacts
from service.engine import Backbone, BackboneSpec
from service.engine.artifacts import PromptArtifact
from service.engine.mixed_batch import predict_single
from service.serving.batcher import _SharedOrAlone
from service.serving.cache import MemorySource
from service.serving.core import EngineCore, ServingConfig
from service.serving.errors import PromptNotFoundError

# prompts at different layers (input, stem, every stage) so that batches mix layers
LAYERS = [(0,), (1,), (3,), (5,), (8,), (10,), (4, 9)]


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))  # [n, 3, 32, 32]


def _reference(bb: Backbone, art: PromptArtifact, x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(predict_single(bb, art, x), dim=1)  # [n, K]


@pytest.fixture()
def prompts(make_artifact: Callable[..., PromptArtifact]) -> dict[str, PromptArtifact]:
    """Twelve prompts of three 'tenants' (keys only: tenancy is resolved before the serving layer)."""
    return {
        f"tenant{i % 3}/p{i}": make_artifact(i, LAYERS[i % len(LAYERS)], num_classes=3 + i % 6)
        for i in range(12)
    }


def _source(prompts: dict[str, PromptArtifact]) -> MemorySource:
    return MemorySource({k: a.to_bytes() for k, a in prompts.items()})


@pytest.mark.parametrize("lanes", [1, 3])
def test_concurrent_requests_equal_sequential_ones(
    resnet20_spec: BackboneSpec, resnet20: Backbone, prompts: dict[str, PromptArtifact], lanes: int
) -> None:
    keys = list(prompts)
    requests = [(keys[i % len(keys)], _images(1 + i % 4, seed=i)) for i in range(36)]

    async def run() -> None:
        # a burst of 36 requests at once: admission control would refuse part of it (tested elsewhere)
        config = ServingConfig(max_wait_ms=20, max_batch_rows=32, queue_budget_ms=60_000, model_lanes=lanes)
        pred = EngineCore(_source(prompts), config)
        try:
            sequential = [
                (await pred.predict(spec_, [k], x))[0] for k, x in requests for spec_ in [resnet20_spec]
            ]
            batches_before = (await pred.stats())["backbones"]
            concurrent = await asyncio.gather(
                *(pred.predict(resnet20_spec, [k], x, tenant_id=k.split("/")[0]) for k, x in requests)
            )
            stats = next(iter((await pred.stats())["backbones"].values()))["batches"]
            before = next(iter(batches_before.values()))["batches"]
            # the concurrent ones really were batched together (fewer passes than requests), mixing layers
            assert stats["batches"] - before["batches"] < len(requests) / 3
            for (k, x), seq, (con,) in zip(requests, sequential, concurrent, strict=True):
                assert con.key == k and con.classes == prompts[k].classes
                assert con.probabilities.shape == (x.shape[0], prompts[k].num_classes)
                torch.testing.assert_close(con.probabilities, seq.probabilities, atol=1e-5, rtol=0)
                torch.testing.assert_close(
                    con.probabilities, _reference(resnet20, prompts[k], x), atol=1e-5, rtol=0
                )
                assert torch.equal(con.probabilities.argmax(1), seq.probabilities.argmax(1))
        finally:
            await pred.aclose()

    asyncio.run(run())


def test_deleted_prompt_is_never_served(
    resnet20_spec: BackboneSpec, prompts: dict[str, PromptArtifact]
) -> None:
    key, other = "tenant0/p0", "tenant1/p1"
    x = _images(2, seed=0)

    async def run() -> None:
        source = _source(prompts)
        pred = EngineCore(source, ServingConfig(max_wait_ms=50))
        try:
            await pred.predict(resnet20_spec, [key], x)  # now cached on host and in a slot
            srv = await pred.server(resnet20_spec)
            assert key in pred.cache and key in srv.policy
            # queued behind the batching window, then deleted before its pass: refused, not served stale
            both_queued = asyncio.Event()
            queue = srv.batcher._queue  # white box: the moment both are in the batcher, not a sleep
            put = queue.put

            def counting_put(tenant: str, item: Any, rows: int) -> None:
                put(tenant, item, rows)
                counting_put.calls += 1  # type: ignore[attr-defined]
                if counting_put.calls == 2:  # type: ignore[attr-defined]
                    both_queued.set()

            counting_put.calls = 0  # type: ignore[attr-defined]
            queue.put = counting_put  # type: ignore[method-assign]
            queued = asyncio.ensure_future(pred.predict(resnet20_spec, [key], x))
            alive = asyncio.ensure_future(pred.predict(resnet20_spec, [other], x))
            await both_queued.wait()
            del source.data[key]
            await pred.invalidate(key)
            with pytest.raises(PromptNotFoundError):
                await queued
            assert (await alive)[0].key == other  # the rest of that batch is answered
            assert key not in pred.cache and key not in srv.policy
            with pytest.raises(PromptNotFoundError):
                await pred.predict(resnet20_spec, [key], x)
            # replaced under the same key: the new artifact is served, never the cached old one
            source.data[key] = prompts[other].to_bytes()
            await pred.invalidate(key)
            (out,) = await pred.predict(resnet20_spec, [key], x)
            assert out.classes == prompts[other].classes
        finally:
            await pred.aclose()

    asyncio.run(run())


@pytest.mark.parametrize("lanes", [1, 3])
def test_cache_smaller_than_working_set_answers_everything(
    resnet20_spec: BackboneSpec, resnet20: Backbone, prompts: dict[str, PromptArtifact], lanes: int
) -> None:
    size = max(len(a.to_bytes()) for a in prompts.values())
    config = ServingConfig(
        host_cache_bytes=3 * size,
        device_cache_bytes=1,
        min_slots=4,
        max_slots=4,
        max_batch_rows=8,
        max_wait_ms=2,
        model_lanes=lanes,
    )
    rng = random.Random(0)
    keys = list(prompts)
    requests = [(rng.choice(keys), _images(rng.randint(1, 3), seed=100 + i)) for i in range(60)]

    async def run() -> None:
        pred = EngineCore(_source(prompts), config)
        try:
            await pred.pin(resnet20_spec, keys[0])
            outs = await asyncio.gather(*(pred.predict(resnet20_spec, [k], x) for k, x in requests))
            for (k, x), (out,) in zip(requests, outs, strict=True):
                torch.testing.assert_close(
                    out.probabilities, _reference(resnet20, prompts[k], x), atol=1e-5, rtol=0
                )
            srv = await pred.server(resnet20_spec)
            assert srv.policy.capacity == 4 and srv.policy.stats.evictions > 0
            assert pred.cache.stats.evictions > 0 and pred.cache.resident_bytes <= 3 * size
            assert keys[0] in pred.cache and keys[0] in srv.policy  # pinned: survived the pressure
        finally:
            await pred.aclose()

    asyncio.run(run())


def test_several_prompts_share_the_prefix(
    resnet20_spec: BackboneSpec, resnet20: Backbone, make_artifact: Callable[..., PromptArtifact]
) -> None:
    arts = {f"m{i}": make_artifact(50 + i, (5 + i,), num_classes=4) for i in range(4)}  # layers 5..8
    x = _images(3, seed=7)

    async def run() -> None:
        # eager segments: a module hook is how this test sees the stem run (a traced segment has none)
        pred = EngineCore(_source(arts), ServingConfig(traced_segments=False))
        try:
            srv = await pred.server(resnet20_spec)
            seen: list[int] = []
            stem = srv.backbone.model.get_submodule(srv.backbone.layers[1].name)
            handle = stem.register_forward_hook(lambda _m, inp, _o: seen.append(int(inp[0].shape[0])))
            try:
                outs = await pred.predict(resnet20_spec, list(arts), x)
            finally:
                handle.remove()
            assert seen == [3]  # the stem ran once on the 3 images, not on 3 x 4 rows
            for out in outs:
                torch.testing.assert_close(
                    out.probabilities, _reference(resnet20, arts[out.key], x), atol=1e-5, rtol=0
                )
        finally:
            await pred.aclose()

    asyncio.run(run())


def test_prompt_wider_than_the_slot_table_is_still_served(
    resnet20_spec: BackboneSpec, resnet20: Backbone, make_artifact: Callable[..., PromptArtifact]
) -> None:
    arts = {"narrow": make_artifact(60, (8,), num_classes=3), "wide": make_artifact(61, (8,), num_classes=9)}
    x = _images(2, seed=3)

    async def run() -> None:
        pred = EngineCore(_source(arts), ServingConfig(max_classes=4))
        try:
            outs = await pred.predict(resnet20_spec, ["wide", "narrow"], x)
            assert [o.key for o in outs] == ["wide", "narrow"]
            for out in outs:
                torch.testing.assert_close(
                    out.probabilities, _reference(resnet20, arts[out.key], x), atol=1e-5, rtol=0
                )
            srv = await pred.server(resnet20_spec)
            assert "wide" not in srv.policy and "narrow" in srv.policy
        finally:
            await pred.aclose()

    asyncio.run(run())


def test_a_prompt_that_cannot_be_written_fails_alone(
    resnet20_spec: BackboneSpec, resnet20: Backbone, make_artifact: Callable[..., PromptArtifact]
) -> None:
    from bench.synthetic import random_artifact
    from service.engine import ArtifactError

    full = random_artifact(resnet20, layers=(), num_classes=3, seed=1, method="full")  # copies the backbone
    arts = {"full": full, "ok": make_artifact(62, (8,), num_classes=3)}
    x = _images(2, seed=4)

    async def run() -> None:
        pred = EngineCore(_source(arts), ServingConfig(max_wait_ms=50))
        try:
            bad, good = await asyncio.gather(
                pred.predict(resnet20_spec, ["full"], x),
                pred.predict(resnet20_spec, ["ok"], x),
                return_exceptions=True,
            )
            assert isinstance(bad, ArtifactError), bad
            assert not isinstance(good, BaseException)
            torch.testing.assert_close(
                good[0].probabilities, _reference(resnet20, arts["ok"], x), atol=1e-5, rtol=0
            )
            srv = await pred.server(resnet20_spec)
            assert srv.batcher.stats.batches == 1 and "full" not in srv.policy
        finally:
            await pred.aclose()

    asyncio.run(run())


def test_lora_prompts_are_held_by_bytes_in_both_tiers_and_served_with_the_others(
    resnet20: Backbone, resnet20_spec: BackboneSpec, prompts: dict[str, PromptArtifact]
) -> None:
    """A LoRA artifact is kilobytes on the host tier (its serialized size), its factors live in the
    device tier's slot table, and a request mixing it with AP prompts scores each as its own forward."""
    loras = random_lora_artifacts(resnet20, 2, rank=4, num_classes=5, seed=3, scale=0.05)
    mixed = {"tenant0/lora0": loras[0], "tenant1/lora1": loras[1], "tenant2/p2": prompts["tenant2/p2"]}
    x = _images(3, seed=4)

    async def run() -> None:
        pred = EngineCore(_source(mixed), ServingConfig(max_wait_ms=20))
        try:
            srv = await pred.server(resnet20_spec)
            empty = srv.table.device_bytes
            out = await pred.predict(resnet20_spec, list(mixed), x)
            for res in out:
                torch.testing.assert_close(
                    res.probabilities, _reference(resnet20, mixed[res.key], x), atol=1e-5, rtol=1e-5
                )
            size = sum(len(a.to_bytes()) for a in mixed.values())
            assert pred.cache.resident_bytes == size and srv.policy.resident_bytes == size
            assert all(len(a.to_bytes()) < 200_000 for a in loras)  # kilobytes
            assert srv.table.device_bytes - empty >= sum(a.nbytes for a in loras) - 2 * 5 * 65 * 4
            lora_slots = [s for s in range(srv.table.capacity) if srv.table.bank.lora.modules(s)]
            assert len(lora_slots) == 2
        finally:
            await pred.aclose()

    asyncio.run(run())


def test_lanes_run_passes_side_by_side_and_a_slot_write_alone(
    resnet20_spec: BackboneSpec, resnet20: Backbone, prompts: dict[str, PromptArtifact]
) -> None:
    """Two lanes overlap their passes; a write into the slot table never overlaps a pass."""
    size = max(len(a.to_bytes()) for a in prompts.values())
    config = ServingConfig(
        max_batch_rows=4,
        max_wait_ms=1,
        model_lanes=2,
        min_slots=4,
        max_slots=4,
        device_cache_bytes=4 * size,
        queue_budget_ms=60_000,
    )
    keys = list(prompts)
    requests = [(keys[i % len(keys)], _images(4, seed=200 + i)) for i in range(24)]
    lock = threading.Lock()
    passes, most, overlapped_writes = 0, 0, 0

    async def run() -> None:
        nonlocal passes, most, overlapped_writes
        pred = EngineCore(_source(prompts), config)
        try:
            srv = await pred.server(resnet20_spec)
            forward, write = srv.table.forward, srv.table.write

            def counted_forward(*args: Any) -> torch.Tensor:
                nonlocal passes, most
                with lock:
                    passes += 1
                    most = max(most, passes)
                try:
                    time.sleep(0.02)  # long enough for the other lane to start its own pass
                    return forward(*args)
                finally:
                    with lock:
                        passes -= 1

            def checked_write(*args: Any) -> int:
                nonlocal overlapped_writes
                with lock:
                    overlapped_writes += passes > 0
                return write(*args)

            srv.table.forward, srv.table.write = counted_forward, checked_write  # type: ignore[method-assign]
            outs = await asyncio.gather(*(pred.predict(resnet20_spec, [k], x) for k, x in requests))
            for (k, x), (out,) in zip(requests, outs, strict=True):
                torch.testing.assert_close(
                    out.probabilities, _reference(resnet20, prompts[k], x), atol=1e-5, rtol=0
                )
            assert srv.policy.stats.evictions > 0  # 12 prompts through 4 slots: writes between passes
        finally:
            await pred.aclose()

    asyncio.run(run())
    assert most == 2 and overlapped_writes == 0


def test_a_slot_write_goes_before_passes_that_come_after_it() -> None:
    """A write waits for the passes already running; a pass that comes after it waits for the write,
    even when the write could not take the lock at once."""

    async def run() -> list[str]:
        bank = _SharedOrAlone()
        order: list[str] = []

        async def write() -> None:
            async with bank.alone():
                order.append("write")

        async def later_pass() -> None:
            async with bank.shared():
                order.append("pass")

        async with bank.shared():  # a pass is running
            async with bank._changed:  # and the lock is busy when the write arrives
                writer = asyncio.create_task(write())
                await asyncio.sleep(0)
                assert bank._waiting_alone == 1  # counted before it waited for anything
            reader = asyncio.create_task(later_pass())
            await asyncio.sleep(0.01)
            assert order == []  # the write waits for the running pass, the later pass for the write
        await asyncio.gather(writer, reader)
        return order

    assert asyncio.run(run()) == ["write", "pass"]


@pytest.mark.parametrize("optimised", [True, False])
def test_the_engine_serves_the_traces_its_config_asks_for(
    resnet20_spec: BackboneSpec,
    resnet20: Backbone,
    make_artifact: Callable[..., PromptArtifact],
    optimised: bool,
) -> None:
    """Optimised traces (channels-last, norms folded) by default, within 1e-5 of eager scoring; off, the
    exact traces."""
    arts = {"p": make_artifact(70, (8,), num_classes=5)}
    x = _images(4, seed=9)

    async def run() -> None:
        core = EngineCore(_source(arts), ServingConfig(optimised_segments=optimised))
        try:
            srv = await core.server(resnet20_spec)
            assert srv.backbone._traced is not None
            assert srv.backbone._traced_channels_last is optimised
            (out,) = await core.predict(resnet20_spec, ["p"], x)
            torch.testing.assert_close(
                out.probabilities, _reference(resnet20, arts["p"], x), atol=1e-5, rtol=0
            )
        finally:
            await core.aclose()

    asyncio.run(run())


def test_model_threads_run_at_the_configured_lower_priority(resnet20_spec: BackboneSpec) -> None:
    def own_nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    async def run() -> None:
        niced = EngineCore(_source({}), ServingConfig(model_nice=3))
        plain = EngineCore(_source({}), ServingConfig())
        try:
            base = own_nice()
            niced_srv, plain_srv = await niced.server(resnet20_spec), await plain.server(resnet20_spec)
            assert await niced_srv.batcher.run_on_model_thread(own_nice) == min(19, base + 3)
            assert await plain_srv.batcher.run_on_model_thread(own_nice) == base
            assert own_nice() == base  # the event loop's thread keeps its priority
        finally:
            await niced.aclose()
            await plain.aclose()

    asyncio.run(run())
