"""`method: "auto"`: train the servable candidates on the training split and choose one on validation.

The benchmark (bench/results/REPORT.md) ranks the servable methods differently per backbone and budget:
AP at one layer is the cheapest to train, deep AP + norm-tune closes most of the gap to LoRA, and LoRA is
the most accurate at the reference budget. Rather than asking a user to know which, `auto` trains each
candidate at its own learning rate on the training split, scores it on the validation split and keeps
one. The test split never decides: candidates train without it, and only the chosen module is
evaluated on it. Every candidate's row (validation accuracy, trainable parameters, training seconds,
per-image serving cost) is reported, so the choice can be checked. The search checkpoints like one
method's training does (`search_checkpoint`): a restarted search trains only what was not finished.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from service.engine.artifacts import PromptArtifact
from service.engine.errors import MethodError
from service.engine.methods import get_method_class
from service.engine.search_checkpoint import (
    FinishedCandidate,
    RunningCandidate,
    SearchProgress,
    restore_search,
    search_fingerprint,
)
from service.engine.train import Checkpoint, TrainConfig, TrainResult, artifact_metrics, evaluate

if TYPE_CHECKING:
    from service.engine.backbones import Backbone
    from service.engine.methods.base import MethodConfig, PromptModule
    from service.engine.pipeline import PipelineCallbacks, PipelineResult, PreparedData

#: The method name a job asks for to get the search.
AUTO = "auto"
#: What `prefer` may ask for: the best validation accuracy, or the cheapest serving cost among the
#: candidates within `tolerance` of it.
PREFERENCES = ("accuracy", "cost")


@dataclass(frozen=True)
class Candidate:
    """One method the search may choose, with the options and learning rate it trains at.

    The rates are those the benchmark chose on validation for these methods on ResNet-20 and on the
    CIFAR ViT (GTSRB, AdamW, cosine): AP at one layer 0.1, deep AP + norm-tune 0.03, LoRA 0.01.
    """

    method: str
    learning_rate: float
    prompt_layer: Any = None  # as a job asks for it; "auto" = the layer probe
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.method} ({extra})" if extra else self.method


#: Cheapest to train first, so that a `max_train_seconds` budget cuts the expensive ones.
DEFAULT_CANDIDATES: tuple[Candidate, ...] = (
    Candidate("activation", 0.1, prompt_layer="auto"),
    Candidate("deep_activation_norm", 0.03),
    Candidate("lora", 0.01, options={"lora_rank": 4}),
)


@dataclass(frozen=True)
class AutoConfig:
    """Options of `method: "auto"`.

    Attributes:
        max_train_seconds: a budget on the search's training time: candidates run in order, and none
            starts once the seconds spent reach it (the first always runs). None = every candidate.
        prefer: "accuracy" (the best validation accuracy; ties to the fewer parameters) or "cost"
            (the cheapest per-image serving cost among candidates within `tolerance` of the best).
        tolerance: validation accuracy (a fraction, 0.01 = one point) that "cost" may give up.
        candidates: the methods tried, in order (the servable ones of `DEFAULT_CANDIDATES`).
    """

    max_train_seconds: float | None = None
    prefer: str = "accuracy"
    tolerance: float = 0.01
    candidates: tuple[Candidate, ...] = DEFAULT_CANDIDATES

    def __post_init__(self) -> None:
        if self.prefer not in PREFERENCES:
            raise MethodError(
                f"prefer must be one of {', '.join(PREFERENCES)}, got {self.prefer!r}",
                code="invalid_method_option",
                param="prefer",
            )
        if self.max_train_seconds is not None and not self.max_train_seconds > 0:
            raise MethodError(
                "max_train_seconds must be > 0", code="invalid_method_option", param="max_train_seconds"
            )
        if not 0 <= self.tolerance <= 1:
            raise MethodError(
                "tolerance must be within [0, 1]", code="invalid_method_option", param="tolerance"
            )
        if not self.candidates:
            raise MethodError("auto needs at least one candidate", code="invalid_method_option")

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> AutoConfig:
        """From a job's method options: `max_train_seconds`, `prefer`, `tolerance`; others are refused."""
        known = ("max_train_seconds", "prefer", "tolerance")
        for key in options or {}:
            if key not in known:
                raise MethodError(
                    f"method 'auto' takes no option {key!r} (it takes {', '.join(known)})",
                    code="invalid_method_option",
                    param=key,
                )
        return cls(**{k: v for k, v in (options or {}).items() if v is not None})

    def servable_candidates(self) -> list[Candidate]:
        return [c for c in self.candidates if get_method_class(c.method).servable]


def serving_ms_per_image(
    module: PromptModule, x: torch.Tensor, *, batch: int = 64, repeats: int = 3
) -> float:
    """Milliseconds per image of the trained module's forward on one batch (median of `repeats`, after a
    warm-up): what one more row of this method costs the serving pass, measured the same way for all."""
    xb = x[:batch].to(module.backbone.device)
    module.eval()
    times = []
    with torch.inference_mode():
        module(xb)  # warm-up (allocator, lazy init)
        for _ in range(repeats):
            t0 = time.perf_counter()
            module(xb)
            times.append(time.perf_counter() - t0)
    return round(1000 * statistics.median(times) / max(1, len(xb)), 4)


def choose(rows: list[dict[str, Any]], prefer: str = "accuracy", tolerance: float = 0.01) -> dict[str, Any]:
    """The chosen row among the trained ones, by validation accuracy only (never test).

    "accuracy": the best validation accuracy, ties to the fewer trainable parameters (deterministic),
    then the cheaper serving cost. "cost": the cheapest serving cost among rows within `tolerance` of
    the best.
    """
    trained = [r for r in rows if r.get("val_accuracy") is not None]
    if not trained:
        raise MethodError("auto trained no candidate")
    best = max(r["val_accuracy"] for r in trained)
    if prefer == "cost":
        near = [r for r in trained if r["val_accuracy"] >= best - tolerance]
        return min(near, key=lambda r: (r["serving_ms_per_image"], -r["val_accuracy"]))
    return max(trained, key=lambda r: (r["val_accuracy"], -r["trainable_params"], -r["serving_ms_per_image"]))


def train_auto(
    backbone: Backbone,
    data: PreparedData,
    *,
    auto: AutoConfig | None = None,
    config: TrainConfig | None = None,
    callbacks: PipelineCallbacks | None = None,
    on_candidate: Callable[[dict[str, Any]], None] | None = None,
    resume: Checkpoint | None = None,
) -> PipelineResult:
    """Train every servable candidate on `data.train`, choose on `data.val`, evaluate the chosen on test.

    Args:
        config: the job's training config; each candidate replaces its learning rate with its own.
        callbacks: progress, epochs, cancel and the layer probe, passed to each candidate's training;
            `on_checkpoint` gets the search's own checkpoints (see `search_checkpoint`): after every
            epoch of a candidate and once each candidate is finished. `on_layer_selected` is not
            called: the probe's layer belongs to the candidate, not to the job.
        on_candidate: called with each candidate's row once it is trained (or skipped by the budget);
            not again for the candidates a resumed search found finished.
        resume: a checkpoint of this same search: its finished candidates are not trained again and
            keep their rows, the running one continues at its next epoch.

    Returns:
        The chosen candidate's result; its metrics carry `auto` = {candidates, chosen, prefer, ...}.
    """
    from service.engine.pipeline import PipelineCallbacks, PreparedData, train_prompt

    opts = auto or AutoConfig()
    if data.val is None:
        raise MethodError(
            "method 'auto' chooses on the validation split; the dataset has none (set val_fraction > 0)",
            code="invalid_method_option",
            param="method",
        )
    cb = callbacks or PipelineCallbacks()
    base = config or TrainConfig()
    fingerprint = search_fingerprint(backbone, data, opts, base)
    running: RunningCandidate | None = None
    if resume is None:
        progress = SearchProgress(fingerprint)
    else:
        progress, running = restore_search(resume, fingerprint, backbone, data.classes)
    view = PreparedData(data.classes, data.train, data.val, None, data.report)  # no test: it never decides
    for index, cand in enumerate(opts.servable_candidates()):
        if index < len(progress.finished):
            continue
        row: dict[str, Any] = {
            "method": cand.method,
            "label": cand.label,
            "learning_rate": cand.learning_rate,
        }
        spent = sum(f.seconds for f in progress.finished)
        if opts.max_train_seconds is not None and progress.finished and spent >= opts.max_train_seconds:
            row.update(skipped=f"training budget of {opts.max_train_seconds:g} s spent", val_accuracy=None)
            progress.finished.append(FinishedCandidate.of(row, None))
            if on_candidate is not None:
                on_candidate(row)
            continue
        resumed = running if running is not None and running.index == index else None
        trained = train_prompt(
            backbone,
            view,
            cand.method,
            prompt_layer=cand.prompt_layer,
            layers=None if resumed is None else resumed.layers,  # the probe's layer, not probed again
            method_options=dict(cand.options),
            config=replace(base, learning_rate=cand.learning_rate),
            callbacks=_candidate_callbacks(cb, progress, index),
            resume=None if resumed is None else resumed.checkpoint,
        )
        module = trained.result.module
        assert module is not None
        row.update(
            layers=list(trained.layers),
            val_accuracy=trained.accuracy("val"),
            trainable_params=int(trained.metrics["trainable_params"]),
            train_seconds=round(float(trained.metrics["train_seconds"]), 3),
            serving_ms_per_image=serving_ms_per_image(module, data.val[0]),
        )
        progress.finished.append(FinishedCandidate.of(row, trained))
        if cb.on_checkpoint is not None:  # before the row is reported: a crash after it retrains nothing
            cb.on_checkpoint(progress.checkpoint())
        if on_candidate is not None:
            on_candidate(row)
    return _chosen_result(progress, opts, data)


def _candidate_callbacks(cb: PipelineCallbacks, progress: SearchProgress, index: int) -> PipelineCallbacks:
    """A candidate's callbacks: the job's progress and cancel; its per-epoch checkpoints become the
    search's (with the layers it started on); it neither selects the job's layer nor is the choice."""
    layers: list[int] = []

    def on_start(method: str, method_config: MethodConfig, train_config: TrainConfig) -> None:
        layers[:] = [int(i) for i in method_config.prompt_layers]
        if cb.on_start is not None:
            cb.on_start(method, method_config, train_config)

    def on_checkpoint(ckpt: Checkpoint) -> None:
        assert cb.on_checkpoint is not None
        cb.on_checkpoint(progress.checkpoint(RunningCandidate(index, list(layers), ckpt)))

    return replace(
        cb,
        on_start=on_start,
        on_checkpoint=None if cb.on_checkpoint is None else on_checkpoint,
        on_layer_selected=None,
        on_candidate=None,
    )


def _chosen_result(progress: SearchProgress, opts: AutoConfig, data: PreparedData) -> PipelineResult:
    """The chosen candidate on validation, evaluated on test, with every candidate's row in its metrics."""
    rows = [f.row for f in progress.finished]
    chosen_row = choose(rows, opts.prefer, opts.tolerance)
    index = rows.index(chosen_row)
    chosen = progress.finished[index].result
    assert chosen is not None and chosen.result.module is not None
    for i, row in enumerate(rows):
        row["chosen"] = i == index
    metrics = dict(chosen.metrics)
    if data.test is not None:
        metrics["test"] = evaluate(chosen.result.module, data.test, classes=data.classes)
    metrics["auto"] = {
        "chosen": chosen.method,
        "prefer": opts.prefer,
        "tolerance": opts.tolerance,
        "max_train_seconds": opts.max_train_seconds,
        "train_seconds": round(sum(f.seconds for f in progress.finished), 3),
        "candidates": rows,
    }
    artifact = PromptArtifact.from_module(
        chosen.result.module, classes=data.classes, metrics=artifact_metrics(metrics)
    )
    result = TrainResult(artifact=artifact, metrics=metrics, module=chosen.result.module)
    return replace(chosen, result=result)
