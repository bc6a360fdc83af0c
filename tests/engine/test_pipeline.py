"""The one training pipeline: splits with sizes, per-method options, RNG isolation."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from service.engine import BackboneSpec, EngineError, MethodConfig, create_backbone
from service.engine.backbones import Backbone
from service.engine.data import ImageSet, LoadedDataset, ValidationReport
from service.engine.pipeline import SplitSpec, prepare_dataset, split_dataset, train_prompt
from service.engine.train import TrainConfig


@pytest.fixture(scope="module")
def bb() -> Backbone:
    return create_backbone(BackboneSpec("test_resnet", input_size=(32, 32)))


def _dataset(n: int = 40, n_test: int = 20) -> LoadedDataset:
    rng = np.random.default_rng(0)
    train = ImageSet(rng.integers(0, 255, (n, 16, 16, 3)).astype(np.uint8), np.arange(n) % 2)
    test = ImageSet(rng.integers(0, 255, (n_test, 16, 16, 3)).astype(np.uint8), np.arange(n_test) % 2)
    report = ValidationReport(2, {"a": n // 2, "b": n // 2}, num_train=n, num_test=n_test)
    return LoadedDataset(["a", "b"], train, None, test, report)


def test_split_sizes_and_seed(bb: Backbone) -> None:
    spec = SplitSpec(seed=3, n_train=20, n_val=6, n_test=8)
    ds = split_dataset(_dataset(), spec)
    assert ds.val is not None and ds.test is not None
    assert (len(ds.train), len(ds.val), len(ds.test)) == (20, 6, 8)
    assert (ds.report.num_train, ds.report.num_val, ds.report.num_test) == (20, 6, 8)
    again = split_dataset(_dataset(), spec)
    assert np.array_equal(again.train.labels, ds.train.labels)
    assert np.array_equal(np.asarray(again.train.images), np.asarray(ds.train.images))
    other = split_dataset(_dataset(), SplitSpec(seed=4, n_train=20, n_val=6, n_test=8))
    assert not np.array_equal(np.asarray(other.train.images), np.asarray(ds.train.images))
    data = prepare_dataset(_dataset(), bb, spec)
    assert data.train[0].shape == (20, 3, 32, 32) and data.num_classes == 2


def test_options_that_do_not_apply_are_refused() -> None:
    with pytest.raises(EngineError) as info:
        MethodConfig.for_method("linear", num_classes=2, prompt_shape="channel")
    assert (info.value.code, info.value.param) == ("option_not_applicable", "prompt_shape")
    with pytest.raises(EngineError) as info:
        MethodConfig.for_method("input", num_classes=2, prompt_layers=(2,))
    assert (info.value.code, info.value.param) == ("invalid_prompt_layer", "prompt_layer")
    # defaults are accepted for every method: callers may pass every field uniformly
    assert MethodConfig.for_method("linear", num_classes=2, prompt_shape="full").prompt_layers == ()
    assert MethodConfig.for_method("activation", num_classes=2, prompt_layers=(1,), prompt_shape="channel")


def test_prompt_layer_with_a_method_without_layers_is_refused(bb: Backbone) -> None:
    data = prepare_dataset(_dataset(), bb, SplitSpec(val_fraction=0))
    with pytest.raises(EngineError) as info:
        train_prompt(bb, data, "linear", prompt_layer=2, config=TrainConfig(epochs=1))
    assert info.value.param == "prompt_layer"


def test_training_leaves_the_callers_random_state_alone(bb: Backbone) -> None:
    data = prepare_dataset(_dataset(), bb, SplitSpec(val_fraction=0))
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    train_prompt(bb, data, "activation", prompt_layer=2, config=TrainConfig(epochs=1, seed=7))
    after = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(after[0], expected[0]) and after[1:] == expected[1:]
