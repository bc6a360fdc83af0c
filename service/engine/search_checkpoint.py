"""The checkpoint of a `method: "auto"` search: finished candidates kept, the running one continued.

A search trains its candidates one after another, so a worker that dies in the last one must not train
the others again. Its checkpoint (a `Checkpoint` of kind `search`) holds every finished candidate's row
as it was reported (a resumed search reports the same table, training seconds included, and its budget
counts them) with the candidate's trained state (the chosen one is evaluated and stored without
retraining), and the running candidate's own per-epoch checkpoint with its resolved layers (the layer
probe is not run again). Each checkpoint is whole, so keeping only the newest few loses nothing.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from service.engine.artifacts import PromptArtifact
from service.engine.errors import EngineError, MethodError
from service.engine.methods import MethodConfig, create_method
from service.engine.train import SEARCH, Checkpoint, TrainConfig, TrainResult, artifact_metrics, isolated_rng

if TYPE_CHECKING:
    from service.engine.backbones import Backbone
    from service.engine.method_search import AutoConfig
    from service.engine.pipeline import PipelineResult, PreparedData

#: TrainConfig fields that do not change what a candidate learns (memory and batching of evaluation).
_RESULT_FREE = ("feature_cache_bytes", "eval_batch_size")


def search_fingerprint(
    backbone: Backbone, data: PreparedData, auto: AutoConfig, config: TrainConfig
) -> dict[str, Any]:
    """What must match for a checkpoint to continue this search (JSON-able, so it compares as stored).

    The data are told apart by their classes, split sizes and a digest of the labels, not the pixels:
    a retry on another worker must not be refused for a last-bit difference in resizing.
    """
    labels = hashlib.sha256()
    for split in (data.train, data.val):
        if split is not None:
            labels.update(split[1].cpu().numpy().astype("int64").tobytes())
    fingerprint = {
        "backbone": backbone.spec.spec_hash(),
        "auto": {
            "prefer": auto.prefer,
            "tolerance": auto.tolerance,
            "max_train_seconds": auto.max_train_seconds,
            "candidates": [
                [c.method, c.learning_rate, c.prompt_layer, dict(c.options)] for c in auto.candidates
            ],
        },
        "train_config": {k: v for k, v in asdict(config).items() if k not in _RESULT_FREE},
        "data": {
            "classes": list(data.classes),
            "num_train": len(data.train[1]),
            "num_val": 0 if data.val is None else len(data.val[1]),
            "labels": labels.hexdigest(),
        },
    }
    return dict(json.loads(json.dumps(fingerprint)))


@dataclass
class FinishedCandidate:
    """A candidate's reported row and, unless the budget skipped it, its trained result."""

    row: dict[str, Any]
    result: PipelineResult | None
    stored: dict[str, Any] = field(default_factory=dict, repr=False)  # its part of every checkpoint

    @classmethod
    def of(cls, row: dict[str, Any], result: PipelineResult | None) -> FinishedCandidate:
        """Packed once, when it finishes: later checkpoints reuse the copy instead of cloning again."""
        packed = None if result is None else _pack(result)
        return cls(row, result, {"row": copy.deepcopy(row), "result": packed})

    @property
    def seconds(self) -> float:
        """Its training seconds, unrounded (what the budget adds up)."""
        return 0.0 if self.result is None else float(self.result.metrics["train_seconds"])

    @property
    def epochs(self) -> int:
        return 0 if self.result is None else len(self.result.metrics.get("epochs", []))


@dataclass
class RunningCandidate:
    """The candidate in training: its position, its resolved layers and its last per-epoch checkpoint."""

    index: int
    layers: list[int]
    checkpoint: Checkpoint


@dataclass
class SearchProgress:
    """The finished candidates of one search, in order; `checkpoint()` writes them with the running one."""

    fingerprint: dict[str, Any]
    finished: list[FinishedCandidate] = field(default_factory=list)

    def checkpoint(self, running: RunningCandidate | None = None) -> Checkpoint:
        """A whole checkpoint; its epoch counts the search's epochs (monotonic, so the newest is latest)."""
        epoch = sum(f.epochs for f in self.finished) + (running.checkpoint.epoch if running else 0)
        state: dict[str, Any] = {
            "fingerprint": self.fingerprint,
            "finished": [f.stored for f in self.finished],
            "running": None,
        }
        if running is not None:
            state["running"] = {
                "index": running.index,
                "layers": list(running.layers),
                "epoch": running.checkpoint.epoch,
                "state": running.checkpoint.state,
            }
        return Checkpoint(epoch=epoch, state=state, kind=SEARCH)


def restore_search(
    ckpt: Checkpoint, fingerprint: dict[str, Any], backbone: Backbone, classes: Sequence[str]
) -> tuple[SearchProgress, RunningCandidate | None]:
    """The progress a checkpoint of this same search recorded, its finished candidates rebuilt on
    `backbone`; a checkpoint of one method's training or of another search is a MethodError."""
    if ckpt.kind != SEARCH:
        raise MethodError(
            f"a {ckpt.kind!r} checkpoint is one method's training, not a method search; cannot resume",
            code="invalid_checkpoint",
        )
    st = ckpt.state
    theirs = st.get("fingerprint") or {}
    for key, ours in fingerprint.items():
        if theirs.get(key) != ours:
            raise MethodError(
                f"checkpoint belongs to another method search ({_differs(key, theirs.get(key), ours)} "
                "differs); cannot resume"
            )
    try:
        finished = [
            FinishedCandidate(
                copy.deepcopy(f["row"]),
                None if f["result"] is None else _unpack(f["result"], backbone, classes),
                f,
            )
            for f in st["finished"]
        ]
        running = None
        if st.get("running") is not None:
            r = st["running"]
            if int(r["index"]) != len(finished):
                raise ValueError(f"running candidate {r['index']} after {len(finished)} finished")
            running = RunningCandidate(
                int(r["index"]), [int(i) for i in r["layers"]], Checkpoint(int(r["epoch"]), dict(r["state"]))
            )
    except (KeyError, TypeError, ValueError) as exc:
        raise EngineError(f"unreadable method search checkpoint: {exc}", code="invalid_checkpoint") from None
    return SearchProgress(fingerprint, finished), running


def describe(ckpt: Checkpoint) -> str:
    """One line on what a search checkpoint spares a resumed job."""
    finished = [f["row"].get("label", f["row"].get("method")) for f in ckpt.state.get("finished", [])]
    running = ckpt.state.get("running")
    text = f"{len(finished)} candidate(s) finished" + (f" ({', '.join(finished)})" if finished else "")
    if running is not None:
        text += f", candidate {int(running['index']) + 1} continues after its epoch {running['epoch']}"
    return text


def _differs(key: str, theirs: Any, ours: Any) -> str:
    """`key`, or `key.sub` naming the first option that differs."""
    if isinstance(theirs, dict) and isinstance(ours, dict):
        for sub in sorted(set(theirs) | set(ours)):
            if theirs.get(sub) != ours.get(sub):
                return f"{key}.{sub}"
    return key


def _pack(result: PipelineResult) -> dict[str, Any]:
    """What rebuilds a trained candidate: its configs, layers, metrics and its artifact's tensors (prompt
    and head: kilobytes; not the state dict, which for LoRA holds its private copy of the backbone)."""
    module = result.result.module
    assert module is not None
    return {
        "method": result.method,
        "method_config": result.method_config.to_dict(),
        "train_config": asdict(result.train_config),
        "layers": list(result.layers),
        "metrics": copy.deepcopy(result.metrics),
        "tensors": module.export_tensors(),
    }


def _unpack(packed: dict[str, Any], backbone: Backbone, classes: Sequence[str]) -> PipelineResult:
    from service.engine.pipeline import PipelineResult

    method_config = MethodConfig.from_dict(packed["method_config"])
    with isolated_rng(backbone.device):  # a fresh module draws its head: the caller's RNG must not move
        module = create_method(str(packed["method"]), backbone, method_config)
    module.load_tensors(packed["tensors"])
    module.eval()
    metrics = copy.deepcopy(packed["metrics"])
    artifact = PromptArtifact.from_module(module, classes=classes, metrics=artifact_metrics(metrics))
    return PipelineResult(
        TrainResult(artifact=artifact, metrics=metrics, module=module),
        str(packed["method"]),
        method_config,
        TrainConfig(**packed["train_config"]),
        [int(i) for i in packed["layers"]],
    )
