"""The activation-prompt engine: a plain library (torch, timm, numpy, PIL, safetensors only).

Both the gateway and the workers use it; it reads no settings and no environment variables.
Public names live here; see docs/CONTRACTS.md for what each promises. They are resolved lazily, so that
`service.engine.errors` (the root of every error of the product) can be imported without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.engine.artifacts import PromptArtifact, load_module
    from service.engine.backbone_spec import BackboneSpec
    from service.engine.backbones import (
        Backbone,
        create_backbone,
        list_layers,
        load_checkpoint_state,
    )
    from service.engine.data import (
        ImageSet,
        LoadedDataset,
        ValidationReport,
        load_dataset,
        resolve_dataset_uri,
        split_train_val,
    )
    from service.engine.datasets.base import decode_image
    from service.engine.datasets.transforms import preprocess
    from service.engine.errors import (
        ArtifactError,
        BackboneError,
        DatasetError,
        EngineError,
        ImageDecodeError,
        LayerError,
        MethodError,
        TrainingCancelled,
    )
    from service.engine.layer_search import SearchBudget, auto_select_layer
    from service.engine.layers import LayerInfo, NormLayerInfo, channel_shape, resolve_prompt_layers
    from service.engine.methods import (
        ActivationConfig,
        DeepActivationNormConfig,
        FullConfig,
        InputPromptConfig,
        LinearConfig,
        LoRAConfig,
        MethodConfig,
        NormConfig,
        PromptModule,
        create_method,
        get_config_class,
        get_method_class,
        list_methods,
        register_method,
    )
    from service.engine.mixed_batch import (
        PromptBank,
        forward_mixed,
        forward_mixed_from,
        forward_multi,
        predict_single,
    )
    from service.engine.pipeline import (
        PipelineCallbacks,
        PipelineResult,
        PreparedData,
        SplitSpec,
        prepare_dataset,
        train_prompt,
    )
    from service.engine.train import (
        Checkpoint,
        EpochMetrics,
        ProgressEvent,
        TrainCallbacks,
        TrainConfig,
        TrainResult,
        evaluate,
        fit,
    )

#: public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "ActivationConfig": "service.engine.methods",
    "ArtifactError": "service.engine.errors",
    "Backbone": "service.engine.backbones",
    "BackboneError": "service.engine.errors",
    "BackboneSpec": "service.engine.backbone_spec",
    "Checkpoint": "service.engine.train",
    "DatasetError": "service.engine.errors",
    "DeepActivationNormConfig": "service.engine.methods",
    "EngineError": "service.engine.errors",
    "EpochMetrics": "service.engine.train",
    "FullConfig": "service.engine.methods",
    "ImageDecodeError": "service.engine.errors",
    "ImageSet": "service.engine.data",
    "InputPromptConfig": "service.engine.methods",
    "LayerError": "service.engine.errors",
    "LayerInfo": "service.engine.layers",
    "LinearConfig": "service.engine.methods",
    "LoRAConfig": "service.engine.methods",
    "LoadedDataset": "service.engine.data",
    "MethodConfig": "service.engine.methods",
    "MethodError": "service.engine.errors",
    "NormConfig": "service.engine.methods",
    "NormLayerInfo": "service.engine.layers",
    "PipelineCallbacks": "service.engine.pipeline",
    "PipelineResult": "service.engine.pipeline",
    "PreparedData": "service.engine.pipeline",
    "ProgressEvent": "service.engine.train",
    "PromptArtifact": "service.engine.artifacts",
    "PromptBank": "service.engine.mixed_batch",
    "PromptModule": "service.engine.methods",
    "SearchBudget": "service.engine.layer_search",
    "SplitSpec": "service.engine.pipeline",
    "TrainCallbacks": "service.engine.train",
    "TrainConfig": "service.engine.train",
    "TrainResult": "service.engine.train",
    "TrainingCancelled": "service.engine.errors",
    "ValidationReport": "service.engine.data",
    "auto_select_layer": "service.engine.layer_search",
    "channel_shape": "service.engine.layers",
    "create_backbone": "service.engine.backbones",
    "create_method": "service.engine.methods",
    "decode_image": "service.engine.datasets.base",
    "evaluate": "service.engine.train",
    "fit": "service.engine.train",
    "forward_mixed": "service.engine.mixed_batch",
    "forward_mixed_from": "service.engine.mixed_batch",
    "forward_multi": "service.engine.mixed_batch",
    "get_config_class": "service.engine.methods",
    "get_method_class": "service.engine.methods",
    "list_layers": "service.engine.backbones",
    "list_methods": "service.engine.methods",
    "load_checkpoint_state": "service.engine.backbones",
    "load_dataset": "service.engine.data",
    "load_module": "service.engine.artifacts",
    "predict_single": "service.engine.mixed_batch",
    "prepare_dataset": "service.engine.pipeline",
    "preprocess": "service.engine.datasets.transforms",
    "register_method": "service.engine.methods",
    "resolve_dataset_uri": "service.engine.data",
    "resolve_prompt_layers": "service.engine.layers",
    "split_train_val": "service.engine.data",
    "train_prompt": "service.engine.pipeline",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'service.engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "ActivationConfig",
    "ArtifactError",
    "Backbone",
    "BackboneError",
    "BackboneSpec",
    "Checkpoint",
    "DatasetError",
    "DeepActivationNormConfig",
    "EngineError",
    "EpochMetrics",
    "FullConfig",
    "ImageDecodeError",
    "ImageSet",
    "InputPromptConfig",
    "LayerError",
    "LayerInfo",
    "LinearConfig",
    "LoRAConfig",
    "LoadedDataset",
    "MethodConfig",
    "MethodError",
    "NormConfig",
    "NormLayerInfo",
    "PipelineCallbacks",
    "PipelineResult",
    "PreparedData",
    "ProgressEvent",
    "PromptArtifact",
    "PromptBank",
    "PromptModule",
    "SearchBudget",
    "SplitSpec",
    "TrainCallbacks",
    "TrainConfig",
    "TrainResult",
    "TrainingCancelled",
    "ValidationReport",
    "auto_select_layer",
    "channel_shape",
    "create_backbone",
    "create_method",
    "decode_image",
    "evaluate",
    "fit",
    "forward_mixed",
    "forward_mixed_from",
    "forward_multi",
    "get_config_class",
    "get_method_class",
    "list_layers",
    "list_methods",
    "load_checkpoint_state",
    "load_dataset",
    "load_module",
    "predict_single",
    "prepare_dataset",
    "preprocess",
    "register_method",
    "resolve_dataset_uri",
    "resolve_prompt_layers",
    "split_train_val",
    "train_prompt",
]
