"""Training of a PromptModule on a frozen backbone: the loop, its callbacks, checkpoints and evaluation.

The backbone stays in eval mode and receives no gradient; the prefix before `first_layer` runs without
autograd and, without augmentation, comes from a FeatureCache. Everything random derives from
`TrainConfig.seed` and the epoch number, so a run resumed from a checkpoint ends where an
uninterrupted run ends (bit for bit on the CPU).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from service.engine.artifacts import PromptArtifact
from service.engine.errors import EngineError, MethodError, TrainingCancelled
from service.engine.feature_cache import FeatureCache
from service.engine.methods import MethodConfig, PromptModule, create_method

if TYPE_CHECKING:
    from service.engine.backbones import Backbone

P = ParamSpec("P")
R = TypeVar("R")

OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one training run (validated here, so every caller gets the same errors)."""

    epochs: int = 10
    batch_size: int = 128
    learning_rate: float = 1e-2
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # | "sgd"
    momentum: float = 0.9  # SGD only
    warmup_epochs: float = 0.0  # linear warm-up, then cosine to zero
    label_smoothing: float = 0.0
    augment: bool = False  # random crop (pad 1/8) + horizontal flip; disables the feature cache
    seed: int = 0
    feature_cache_bytes: int = 2 << 30  # bound on cached prefix activations; beyond it: recompute
    eval_batch_size: int = 256
    amp: bool = True  # bf16 autocast, on CUDA only (the CPU path is always fp32)

    def __post_init__(self) -> None:
        problems = []
        if self.epochs < 1:
            problems.append("epochs must be >= 1")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            problems.append("batch sizes must be >= 1")
        if not self.learning_rate > 0:
            problems.append("learning_rate must be > 0")
        if self.weight_decay < 0:
            problems.append("weight_decay must be >= 0")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {OPTIMIZERS}")
        if not 0 <= self.warmup_epochs <= self.epochs:
            problems.append("warmup_epochs must be within [0, epochs]")
        if not 0 <= self.label_smoothing < 1:
            problems.append("label_smoothing must be within [0, 1)")
        if problems:
            raise EngineError("; ".join(problems), code="invalid_hyperparameters", param="hyperparameters")


@dataclass
class ProgressEvent:
    epoch: int  # 1-based
    epochs: int
    step: int  # 1-based within the epoch
    steps: int
    loss: float  # running mean over the epoch so far
    accuracy: float  # running train accuracy over the epoch so far
    fraction: float  # of the whole run


@dataclass
class EpochMetrics:
    epoch: int  # 1-based
    train_loss: float
    train_accuracy: float
    val_accuracy: float | None
    seconds: float  # training time of this epoch (without validation)


#: The checkpoint payload's layout; a payload from a newer layout is refused rather than misread.
CHECKPOINT_VERSION = 1
#: What a checkpoint continues: one method's training (`fit`) or a whole `method: "auto"` search
#: (`search`, see `search_checkpoint`); payloads written before the tag existed are `fit`.
FIT = "fit"
SEARCH = "search"
CHECKPOINT_KINDS = (FIT, SEARCH)


@dataclass
class Checkpoint:
    """State after `epoch` completed epochs: enough to continue as if never interrupted.

    `kind` tags the payload, so a method search's checkpoint is never fed to `fit` nor the other way
    round (both travel through the same callback and the same stored rows).
    """

    epoch: int
    state: dict[str, Any]
    kind: str = FIT

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        payload = {"version": CHECKPOINT_VERSION, "kind": self.kind, "epoch": self.epoch, "state": self.state}
        torch.save(payload, buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Checkpoint:
        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            version, kind = int(obj.get("version", 1)), str(obj.get("kind", FIT))
            ckpt = cls(epoch=int(obj["epoch"]), state=dict(obj["state"]), kind=kind)
        except Exception as exc:  # a truncated upload or another file: say so, do not crash the worker
            raise EngineError(f"unreadable checkpoint: {exc}", code="invalid_checkpoint") from None
        if version > CHECKPOINT_VERSION or kind not in CHECKPOINT_KINDS:
            raise EngineError(
                f"checkpoint format {kind!r} v{version} is not one this version reads",
                code="invalid_checkpoint",
            )
        return ckpt


@dataclass
class TrainCallbacks:
    on_progress: Callable[[ProgressEvent], None] | None = None  # at most ~10x per epoch
    on_epoch_end: Callable[[EpochMetrics], None] | None = None
    on_checkpoint: Callable[[Checkpoint], None] | None = None  # after every epoch
    should_stop: Callable[[], bool] | None = None  # polled every step -> TrainingCancelled


@dataclass
class TrainResult:
    artifact: PromptArtifact
    metrics: dict[str, Any] = field(default_factory=dict)
    module: PromptModule | None = None  # the trained module, for callers that keep evaluating it


# --- helpers -------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed every RNG a run touches (head init, dropout in `full`); call it inside `isolated_rng`."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@contextlib.contextmanager
def isolated_rng(device: torch.device) -> Iterator[None]:
    """Run a block with forked RNGs: training seeds its own, the caller's global RNG state is untouched
    (embedded mode trains inside the gateway, whose other code must not see its random stream move)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _with_isolated_rng(func: Callable[Concatenate[Backbone, P], R]) -> Callable[Concatenate[Backbone, P], R]:
    """`func` run inside `isolated_rng` on the device of its backbone (the first argument)."""

    @functools.wraps(func)
    def run(backbone: Backbone, /, *args: P.args, **kwargs: P.kwargs) -> R:
        with isolated_rng(backbone.device):
            return func(backbone, *args, **kwargs)

    return run


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.learning_rate, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def _make_scheduler(
    opt: torch.optim.Optimizer, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step linear warm-up then cosine to zero."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def augment_batch(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random crop (reflect pad by 1/8 of the side) + horizontal flip, per image, from `gen`."""
    b, _, h, w = x.shape
    pad = max(1, min(h, w) // 8)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    offsets = torch.randint(0, 2 * pad + 1, (b, 2), generator=gen)
    flips = torch.rand(b, generator=gen) < 0.5
    out = torch.empty_like(x)
    for i in range(b):  # B small slices: cheap next to the forward pass
        dy, dx = int(offsets[i, 0]), int(offsets[i, 1])
        crop = padded[i, :, dy : dy + h, dx : dx + w]
        out[i] = crop.flip(-1) if bool(flips[i]) else crop
    return out


def _batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _fingerprint(method: str, cfg: MethodConfig, tcfg: TrainConfig, n: int) -> dict[str, Any]:
    """What must match for a checkpoint to continue this run."""
    return {"method": method, "method_config": cfg.to_dict(), "train_config": asdict(tcfg), "num_train": n}


# --- evaluation ----------------------------------------------------------------------------------------
def predict_logits(module: PromptModule, x: Tensor, *, batch_size: int = 256, amp: bool = False) -> Tensor:
    """Logits [N, K] (fp32, CPU) of a module in eval mode, in batches."""
    device = module.backbone.device
    module.eval()
    out = []
    with torch.no_grad(), _autocast(device, amp):
        for sl in _batches(len(x), batch_size):
            out.append(module(x[sl].to(device)).float().cpu())
    return torch.cat(out) if out else torch.empty(0, module.config.num_classes)


def evaluate(
    module: PromptModule,
    data: tuple[Tensor, Tensor],
    *,
    classes: Sequence[str],
    batch_size: int = 256,
    amp: bool = False,
) -> dict[str, Any]:
    """Top-1, top-5 and per-class accuracy of `module` on (x [N,3,H,W], y [N])."""
    x, y = data
    logits = predict_logits(module, x, batch_size=batch_size, amp=amp)
    y = y.to(torch.int64).cpu()
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices  # [N, k]
    correct1 = top[:, 0] == y
    correct5 = (top == y[:, None]).any(dim=1)
    per_class: dict[str, float | None] = {}
    for c, name in enumerate(classes):
        mask = y == c
        per_class[str(name)] = float(correct1[mask].float().mean()) if bool(mask.any()) else None
    n = len(y)
    loss = float(F.cross_entropy(logits, y)) if n else float("nan")
    return {
        "top1": float(correct1.float().mean()) if n else 0.0,
        "top5": float(correct5.float().mean()) if n else 0.0,
        "per_class": per_class,
        "loss": loss,
        "n": n,
    }


# --- the loop ------------------------------------------------------------------------------------------
def _check_inputs(x: Tensor, y: Tensor, classes: Sequence[str], num_classes: int) -> None:
    n = len(x)
    if n == 0 or len(y) != n:
        raise MethodError(f"need matching non-empty train images and labels, got {n} and {len(y)}")
    if len(classes) != num_classes:
        raise MethodError(f"{len(classes)} class names for num_classes={num_classes}")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise MethodError(f"train labels must lie in [0, {num_classes})")


@dataclass
class _Loop:
    """Everything one epoch of a run needs: the module, its optimiser and schedule, the training data."""

    module: PromptModule
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    cache: FeatureCache
    x: Tensor
    y: Tensor
    config: TrainConfig
    callbacks: TrainCallbacks
    use_amp: bool

    @property
    def device(self) -> torch.device:
        return self.module.backbone.device

    @property
    def steps(self) -> int:
        return math.ceil(len(self.x) / self.config.batch_size)

    def epoch(self, epoch: int) -> EpochMetrics:
        """One pass over the training set in a seeded order, then the validation score (if any)."""
        cfg, cb, device = self.config, self.callbacks, self.device
        t_epoch = time.perf_counter()
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.x), generator=gen)
        steps, total = self.steps, self.steps * cfg.epochs
        progress_every = max(1, math.ceil(steps / 10))  # at most ~10 events per epoch
        self.module.train()
        # Running sums stay on the device: a host sync only when a progress event is due.
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        seen = 0
        for step in range(steps):
            if cb.should_stop is not None and cb.should_stop():
                raise TrainingCancelled(f"training cancelled at epoch {epoch + 1}, step {step + 1}")
            idx = perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            loss, logits, yb = self._step(idx, gen)
            loss_sum += loss.detach() * len(idx)
            correct += (logits.detach().argmax(1) == yb).sum()
            seen += len(idx)
            if cb.on_progress is not None and ((step + 1) % progress_every == 0 or step + 1 == steps):
                cb.on_progress(
                    ProgressEvent(
                        epoch=epoch + 1,
                        epochs=cfg.epochs,
                        step=step + 1,
                        steps=steps,
                        loss=float(loss_sum) / seen,
                        accuracy=int(correct) / seen,
                        fraction=(epoch * steps + step + 1) / total,
                    )
                )
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the epoch's time includes its queued kernels
        return EpochMetrics(
            epoch + 1, float(loss_sum) / seen, int(correct) / seen, None, time.perf_counter() - t_epoch
        )

    def _step(self, idx: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """One optimiser step on rows `idx`: (loss, logits, labels)."""
        cfg = self.config
        yb = self.y[idx].to(self.device)
        with _autocast(self.device, self.use_amp):
            if cfg.augment:
                h = self.module.prefix(augment_batch(self.x[idx], gen).to(self.device))
            else:
                h = self.cache.get(idx)
            logits = self.module.forward_from(h)
        loss = F.cross_entropy(logits.float(), yb, label_smoothing=cfg.label_smoothing)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        return loss, logits, yb


@_with_isolated_rng
def fit(
    backbone: Backbone,
    method: str,
    method_config: MethodConfig,
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor] | None,
    test: tuple[Tensor, Tensor] | None,
    config: TrainConfig,
    *,
    classes: Sequence[str],
    callbacks: TrainCallbacks | None = None,
    resume: Checkpoint | None = None,
) -> TrainResult:
    """Train `method` on `backbone` and return its artifact with val/test metrics.

    Args:
        train, val, test: (x float32 [N, 3, H, W] preprocessed, y int64 [N]); val/test optional.
        resume: a checkpoint of this same run; training continues at its next epoch.

    Raises:
        TrainingCancelled: `callbacks.should_stop()` returned True.
        MethodError: unknown method, bad config, labels outside the classes, or a foreign checkpoint.
    """
    cb = callbacks or TrainCallbacks()
    device = backbone.device
    x_train, y_train = train[0], train[1].to(torch.int64)
    _check_inputs(x_train, y_train, classes, method_config.num_classes)
    n = len(x_train)

    seed_everything(config.seed)
    module = create_method(method, backbone, method_config)
    opt = _make_optimizer(module.trainable_parameters(), config)
    steps = math.ceil(n / config.batch_size)
    sched = _make_scheduler(opt, steps * config.epochs, round(config.warmup_epochs * steps))
    history: list[dict[str, Any]] = []
    fingerprint = _fingerprint(method, method_config, config, n)
    start_epoch = 0
    if resume is not None:
        start_epoch = _restore(resume, module, opt, sched, fingerprint)
        history = list(resume.state.get("history", []))

    use_amp = config.amp and device.type == "cuda"
    cache = FeatureCache(
        module.prefix,
        x_train,
        max_bytes=0 if config.augment else config.feature_cache_bytes,
        device=device,
    )
    loop = _Loop(module, opt, sched, cache, x_train, y_train, config, cb, use_amp)
    t_start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for epoch in range(start_epoch, config.epochs):
        em = loop.epoch(epoch)
        if val is not None:
            scores = evaluate(module, val, classes=classes, batch_size=config.eval_batch_size, amp=use_amp)
            em = replace(em, val_accuracy=scores["top1"])
        history.append(asdict(em))
        if cb.on_epoch_end is not None:
            cb.on_epoch_end(em)
        if cb.on_checkpoint is not None:
            cb.on_checkpoint(_snapshot(epoch + 1, module, opt, sched, fingerprint, history))

    metrics: dict[str, Any] = {
        "method": method,
        "prompt_layers": list(module.prompt_layers),
        "first_layer": module.first_layer,
        "trainable_params": module.num_trainable(),
        "train_seconds": sum(h["seconds"] for h in history),
        "wall_seconds": time.perf_counter() - t_start,
        "epochs": history,
        "feature_cache": {"rows": cache.capacity, "bytes": cache.nbytes},
    }
    if device.type == "cuda":
        metrics["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
    for split, data in (("val", val), ("test", test)):
        if data is not None:
            metrics[split] = evaluate(
                module, data, classes=classes, batch_size=config.eval_batch_size, amp=use_amp
            )
    module.eval()
    artifact = PromptArtifact.from_module(module, classes=classes, metrics=artifact_metrics(metrics))
    return TrainResult(artifact=artifact, metrics=metrics, module=module)


def artifact_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The summary an artifact carries (no per-class tables, no per-epoch history: kept small)."""
    out: dict[str, Any] = {"train_seconds": round(float(metrics["train_seconds"]), 3)}
    for split in ("val", "test"):
        if split in metrics:
            out[split] = {k: metrics[split][k] for k in ("top1", "top5", "n")}
    return out


def _snapshot(
    epoch: int,
    module: PromptModule,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LambdaLR,
    fingerprint: dict[str, Any],
    history: list[dict[str, Any]],
) -> Checkpoint:
    trainable = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    state = {
        "trainable": trainable,
        "optimizer": _to_cpu(copy.deepcopy(opt.state_dict())),
        "scheduler": sched.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "fingerprint": fingerprint,
        "history": copy.deepcopy(history),
    }
    return Checkpoint(epoch=epoch, state=state)


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


def _restore(
    ckpt: Checkpoint,
    module: PromptModule,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LambdaLR,
    fingerprint: dict[str, Any],
) -> int:
    """Load a checkpoint into fresh training objects; returns the epoch to continue at."""
    if ckpt.kind != FIT:
        raise MethodError(
            f"a {ckpt.kind!r} checkpoint is not one method's training; cannot resume",
            code="invalid_checkpoint",
        )
    st = ckpt.state
    theirs = dict(st.get("fingerprint", {}))
    if isinstance(theirs.get("method_config"), Mapping) and isinstance(theirs.get("method"), str):
        # a checkpoint written before configs carried their type tag: read it as its method's config
        try:
            config = MethodConfig.from_dict(theirs["method_config"], method=theirs["method"])
        except (EngineError, TypeError, ValueError):
            pass  # unreadable: it differs from this run's config below
        else:
            theirs["method_config"] = config.to_dict()
    for key in ("method", "method_config", "num_train"):
        if theirs.get(key) != fingerprint[key]:
            raise MethodError(f"checkpoint belongs to another run ({key} differs); cannot resume")
    if theirs.get("train_config", {}).get("epochs") != fingerprint["train_config"]["epochs"]:
        raise MethodError("checkpoint was written with another number of epochs; cannot resume")
    module.load_state_dict(st["trainable"])
    opt.load_state_dict(st["optimizer"])
    sched.load_state_dict(st["scheduler"])
    torch.set_rng_state(st["torch_rng"])
    return int(ckpt.epoch)
