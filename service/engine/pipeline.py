"""The one training pipeline: dataset → splits → preprocessed tensors → prompt layer → configs → fit.

The job runner, the CLI, the benchmarks and the tests all call `prepare_dataset` and `train_prompt`, so a
benchmark measures exactly what production runs. Each step reports through `PipelineCallbacks` (the
runner turns them into job events); nothing here knows about jobs, databases or settings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from service.engine import train as train_module
from service.engine.data import (
    ImageSet,
    LoadedDataset,
    ValidationReport,
    load_dataset,
    split_train_val,
)
from service.engine.errors import DatasetError, MethodError
from service.engine.layer_search import auto_select_layer
from service.engine.layers import resolve_prompt_layers
from service.engine.method_search import AUTO, AutoConfig, train_auto
from service.engine.methods import MethodConfig, get_method_class
from service.engine.train import Checkpoint, TrainCallbacks, TrainConfig, TrainResult

if TYPE_CHECKING:
    from service.engine.backbones import Backbone

Tensors = tuple[Tensor, Tensor]
LayerRequest = int | str | Sequence[int | str] | None


@dataclass(frozen=True)
class SplitSpec:
    """How the labelled images become train / val / test.

    Without sizes (the product): a dataset's own val split, else a stratified `val_fraction` of train,
    and its own test split. With sizes (benchmarks): a seeded random `n_train + n_val` pool of the train
    split, split stratified into train and val, and a seeded random `n_test` of the test split.
    """

    val_fraction: float = 0.1
    seed: int = 0
    n_train: int | None = None
    n_val: int | None = None
    n_test: int | None = None


@dataclass
class PreparedData:
    """Preprocessed tensors for one backbone, with the class names and the validation report."""

    classes: list[str]
    train: Tensors
    val: Tensors | None
    test: Tensors | None
    report: ValidationReport

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class PipelineCallbacks(TrainCallbacks):
    """`TrainCallbacks` plus the steps before `fit` (each optional)."""

    on_layer_probe: Callable[[dict[str, Any]], None] | None = None  # one row of the auto-layer sweep
    on_layer_selected: Callable[[int, list[dict[str, Any]]], None] | None = None
    on_start: Callable[[str, MethodConfig, TrainConfig], None] | None = None  # just before fit
    on_candidate: Callable[[dict[str, Any]], None] | None = None  # one row of the `auto` method search

    def train_callbacks(self) -> TrainCallbacks:
        return TrainCallbacks(
            on_progress=self.on_progress,
            on_epoch_end=self.on_epoch_end,
            on_checkpoint=self.on_checkpoint,
            should_stop=self.should_stop,
        )


@dataclass
class PipelineResult:
    """What `train_prompt` trained: the engine result plus the resolved layers and configs."""

    result: TrainResult
    method: str
    method_config: MethodConfig
    train_config: TrainConfig
    layers: list[int] = field(default_factory=list)

    @property
    def metrics(self) -> dict[str, Any]:
        return self.result.metrics

    def accuracy(self, split: str) -> float | None:
        """Top-1 on "val" or "test", None when that split was absent."""
        m = self.result.metrics.get(split)
        return None if m is None else float(m["top1"])


# --- data -----------------------------------------------------------------------------------------------
def load_validated(
    path: Path | str, *, min_images_per_class: int = 2, max_bytes: int | None = None
) -> LoadedDataset:
    """Load and validate a local dataset (every format); DatasetError carries the report when it fails."""
    kwargs: dict[str, Any] = {"min_images_per_class": min_images_per_class}
    if max_bytes is not None:
        kwargs["max_bytes"] = max_bytes
    return load_dataset(Path(path), **kwargs)


def split_dataset(ds: LoadedDataset, split: SplitSpec) -> LoadedDataset:
    """Apply `split` (see SplitSpec); deterministic for its seed."""
    if split.n_train is None and split.n_val is None and split.n_test is None:
        return split_train_val(ds, split.val_fraction, split.seed)
    rng = np.random.default_rng(split.seed)
    n_train = min(split.n_train or len(ds.train), len(ds.train))
    n_val = split.n_val or 0
    pool_size = min(len(ds.train), n_train + n_val)
    pool = ds.train.subset(np.sort(rng.permutation(len(ds.train))[:pool_size]))
    base = LoadedDataset(list(ds.classes), pool, None, None, ds.report)
    out = split_train_val(base, n_val / pool_size, split.seed) if n_val and pool_size > n_val else base
    val = out.val if n_val else ds.val
    test = ds.test
    if test is not None and split.n_test is not None:
        # a random subset: some test arrays are sorted by class, so "the first n" is not a sample
        test = test.subset(np.sort(rng.permutation(len(test))[: split.n_test]))
    report = replace(
        out.report,
        num_train=len(out.train),
        num_val=len(val) if val is not None else 0,
        num_test=len(test) if test is not None else 0,
    )
    return LoadedDataset(list(ds.classes), out.train, val, test, report)


def to_tensors(images: ImageSet | None, backbone: Backbone) -> Tensors | None:
    """One split through `backbone`'s pipeline (recorded in the artifact); None for an absent split."""
    if images is None or len(images) == 0:
        return None
    x = backbone.preprocessing(images.images)
    return x, torch.as_tensor(images.labels, dtype=torch.int64)


def load_split(
    dataset: LoadedDataset | Path | str, split: SplitSpec | None = None, *, min_images_per_class: int = 2
) -> LoadedDataset:
    """Load (when given a path), validate and split: everything before the backbone is needed."""
    ds = (
        dataset
        if isinstance(dataset, LoadedDataset)
        else load_validated(dataset, min_images_per_class=min_images_per_class)
    )
    return split_dataset(ds, split or SplitSpec())


def preprocess_splits(ds: LoadedDataset, backbone: Backbone) -> PreparedData:
    """Preprocess an already split dataset for `backbone`."""
    train = to_tensors(ds.train, backbone)
    if train is None:
        raise DatasetError("the dataset has no training images after the split")
    return PreparedData(
        classes=[str(c) for c in ds.classes],
        train=train,
        val=to_tensors(ds.val, backbone),
        test=to_tensors(ds.test, backbone),
        report=ds.report,
    )


def prepare_dataset(
    dataset: LoadedDataset | Path | str,
    backbone: Backbone,
    split: SplitSpec | None = None,
    *,
    min_images_per_class: int = 2,
) -> PreparedData:
    """Load (when given a path), validate, split and preprocess a dataset for `backbone`."""
    return preprocess_splits(load_split(dataset, split, min_images_per_class=min_images_per_class), backbone)


# --- layers and configs ---------------------------------------------------------------------------------
def resolve_method_layers(
    backbone: Backbone,
    method: str,
    prompt_layer: LayerRequest,
    data: PreparedData,
    callbacks: PipelineCallbacks | None = None,
) -> tuple[int, ...]:
    """The prompt layers of `method`: () for methods without layers; None = the backbone's recommended
    layer; "auto" = a budgeted probe on `data` (reported through the callbacks)."""
    cls = get_method_class(method)
    if not cls.uses_prompt_layers():
        if prompt_layer is not None:
            raise MethodError(
                f"prompt_layer applies to methods with prompt layers, not {method!r}",
                code="invalid_prompt_layer",
                param="prompt_layer",
            )
        return ()
    if prompt_layer is None and cls.default_prompt_layer is not None:
        prompt_layer = cls.default_prompt_layer  # deep AP + norm: every block output
    if prompt_layer is None:
        return (int(backbone.recommended_layer),)
    if prompt_layer == "auto":
        cb = callbacks or PipelineCallbacks()
        best, rows = auto_select_layer(
            backbone, data.train, data.val, num_classes=data.num_classes, on_row=cb.on_layer_probe
        )
        if cb.on_layer_selected is not None:
            cb.on_layer_selected(int(best), rows)
        return (int(best),)
    return tuple(resolve_prompt_layers(backbone.layers, prompt_layer))


def train_prompt(
    backbone: Backbone,
    data: PreparedData,
    method: str,
    *,
    prompt_layer: LayerRequest = None,
    layers: Sequence[int] | None = None,
    method_options: dict[str, Any] | None = None,
    config: TrainConfig | None = None,
    callbacks: PipelineCallbacks | None = None,
    resume: Checkpoint | None = None,
) -> PipelineResult:
    """Resolve the prompt layer, build the method's config and fit; the one way anything trains.

    Args:
        prompt_layer: what the user asked for (index, name, list, "all", "auto", None = recommended).
        layers: already resolved layers (a resumed job); skips the resolution and the auto probe.
        method: a registered method, or "auto" (see `method_search`: the candidates trained on train
            and chosen on val; its options are `AutoConfig`'s; its checkpoints are the search's own).
        method_options: the method's own options (e.g. `prompt_shape`, `input_variant`); an option
            the method does not take is a MethodError naming it.
        resume: a checkpoint of this same run (for "auto", of this same search).
    """
    cb = callbacks or PipelineCallbacks()
    if method == AUTO:  # the method search: every servable candidate, chosen on validation
        if prompt_layer is not None:
            raise MethodError(
                "prompt_layer does not apply to method 'auto' (each candidate has its own)",
                code="invalid_prompt_layer",
                param="prompt_layer",
            )
        auto = AutoConfig.from_options(method_options)
        return train_auto(
            backbone,
            data,
            auto=auto,
            config=config,
            callbacks=cb,
            on_candidate=cb.on_candidate,
            resume=resume,
        )
    if layers is None:
        resolved = resolve_method_layers(backbone, method, prompt_layer, data, cb)
    else:
        resolved = tuple(int(i) for i in layers)
    method_config = MethodConfig.for_method(
        method, num_classes=data.num_classes, prompt_layers=resolved, **(method_options or {})
    )
    train_config = config or TrainConfig()
    if cb.on_start is not None:
        cb.on_start(method, method_config, train_config)
    result = train_module.fit(  # looked up at call time (a test can replace it)
        backbone,
        method,
        method_config,
        data.train,
        data.val,
        data.test,
        train_config,
        classes=data.classes,
        callbacks=cb.train_callbacks(),
        resume=resume,
    )
    return PipelineResult(result, method, method_config, train_config, list(method_config.prompt_layers))
