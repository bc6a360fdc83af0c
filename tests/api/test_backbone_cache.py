"""Backbones a worker loads for training are bounded in bytes (least recently used go first)."""

from __future__ import annotations

from service.domain.backbones import BackboneCache
from service.engine import BackboneSpec


def _spec(size: int) -> tuple[dict, str]:
    spec = BackboneSpec("test_resnet", input_size=(size, size)).resolved()
    return spec.to_dict(), spec.spec_hash()


def test_lru_by_bytes() -> None:
    a, b = _spec(32), _spec(40)
    unbounded = BackboneCache()
    first = unbounded.get(*a, "cpu")
    assert unbounded.get(*a, "cpu") is first  # built once, shared
    one = unbounded.nbytes
    assert one > 0
    cache = BackboneCache(max_bytes=one + one // 2)  # room for one backbone, not two
    cache.get(*a, "cpu")
    cache.get(*b, "cpu")
    assert cache.keys() == [(b[1], "cpu")] and cache.nbytes <= cache.max_bytes  # a was dropped
    cache.get(*a, "cpu")
    assert cache.keys() == [(a[1], "cpu")]
