"""Backbone registration (admin), the layer catalog, and the per-process cache of loaded backbones."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from sqlalchemy.orm import Session

from service.db.models import Backbone
from service.db.repositories import BackboneRepository
from service.domain.errors import Conflict, DomainError, found, from_engine_error
from service.engine import BackboneSpec


def register_backbone(session: Session, backbone_id: str, spec: BackboneSpec) -> Backbone:
    """Build the model once on the CPU (a bad name or checkpoint fails here, not in a job)."""
    repo = BackboneRepository(session)
    if repo.get(backbone_id) is not None:
        raise Conflict(f"backbone {backbone_id!r} already exists", code="backbone_exists", param="id")
    from service.engine import EngineError, create_backbone, list_layers

    try:
        backbone = create_backbone(spec, "cpu")
        layers = list_layers(backbone)
    except EngineError as exc:
        raise from_engine_error(exc, default_param="model") from exc
    except (RuntimeError, ValueError, TypeError, KeyError, OSError) as exc:  # timm's own complaints
        raise DomainError(str(exc), code="invalid_backbone", param="model") from exc
    row = Backbone(
        id=backbone_id,
        model=spec.model,
        weights=spec.weights,
        spec=backbone.spec.to_dict(),
        spec_hash=backbone.spec.spec_hash(),
        family=backbone.family,
        num_features=int(backbone.num_features),
        recommended_layer=int(backbone.recommended_layer),
        layers=[_layer_to_dict(layer) for layer in layers],
    )
    return repo.add(row)


def _layer_to_dict(layer: Any) -> dict[str, Any]:
    d = asdict(layer)
    d["shape"] = list(d["shape"])
    return d


def get_backbone(session: Session, backbone_id: str, *, param: str = "backbone_id") -> Backbone:
    return found(BackboneRepository(session).get(backbone_id), "backbone", backbone_id, param=param)


def list_backbones(session: Session) -> list[Backbone]:
    return BackboneRepository(session).list_all()


def delete_backbone(session: Session, backbone_id: str) -> None:
    repo = BackboneRepository(session)
    backbone = get_backbone(session, backbone_id)
    prompts, jobs = repo.count_users(backbone_id)
    if prompts or jobs:
        raise Conflict(
            f"backbone {backbone_id!r} is used by {prompts} prompt version(s) and {jobs} active job(s)",
            code="backbone_in_use",
            param="backbone_id",
        )
    repo.delete(backbone)


def resolve_layers(backbone: Backbone, value: int | str | Sequence[int | str] | None) -> tuple[int, ...]:
    """Resolve a requested prompt layer against the stored catalog (None = the recommended layer)."""
    if value is None:
        return (int(backbone.recommended_layer),)
    from service.engine import EngineError, LayerInfo, resolve_prompt_layers

    catalog = [LayerInfo(**{**d, "shape": tuple(d["shape"])}) for d in backbone.layers]
    try:
        return tuple(int(i) for i in resolve_prompt_layers(catalog, value))
    except EngineError as exc:
        raise from_engine_error(exc, default_param="prompt_layer") from exc


def _model_bytes(backbone: Any) -> int:
    """Bytes of a loaded backbone's parameters and buffers (what holding it costs)."""
    model = getattr(backbone, "model", None)
    if model is None:
        return 0
    tensors = [*model.parameters(), *model.buffers()]
    return int(sum(t.numel() * t.element_size() for t in tensors))


class BackboneCache:
    """Loaded backbones of this process, one per (spec hash, device); built once, shared, never mutated.

    Bounded: beyond `max_bytes` the least recently used backbones are dropped (a worker that trained on
    many backbones does not keep them all). The one just built stays even when it alone exceeds the bound.
    """

    def __init__(self, max_bytes: int | None = None) -> None:
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple[str, str], tuple[Any, int]] = OrderedDict()
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self.max_bytes = max_bytes

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(size for _, size in self._items.values())

    def keys(self) -> list[tuple[str, str]]:
        """(spec hash, device) of the held backbones, least recently used first."""
        with self._lock:
            return list(self._items)

    def _take(self, key: tuple[str, str]) -> Any | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def get(self, spec: Mapping[str, Any], spec_hash: str, device: str) -> Any:
        key = (spec_hash, device)
        with self._lock:
            found = self._take(key)
            if found is not None:
                return found
            build_lock = self._locks.setdefault(key, threading.Lock())
        with build_lock:
            with self._lock:
                found = self._take(key)
                if found is not None:
                    return found
            from service.engine import EngineError, create_backbone

            try:
                backbone = create_backbone(BackboneSpec.from_dict(dict(spec)), device)
            except EngineError as exc:
                raise from_engine_error(exc, default_param="backbone") from exc
            with self._lock:
                self._items[key] = (backbone, _model_bytes(backbone))
                self._evict(keep=key)
            return backbone

    def _evict(self, keep: tuple[str, str]) -> None:
        if self.max_bytes is None:
            return
        while sum(size for _, size in self._items.values()) > self.max_bytes:
            oldest = next(k for k in self._items)
            if oldest == keep:
                return
            del self._items[oldest]
            self._locks.pop(oldest, None)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


#: Backbones loaded by this process for training and for adapter import/export (separate from the
#: serving copies), LRU-bounded by `Settings.training_backbones_bytes`.
TRAINING_BACKBONES = BackboneCache()
