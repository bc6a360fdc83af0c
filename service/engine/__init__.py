"""The activation-prompt engine: a plain library (torch, timm, numpy, PIL, safetensors only).

Both the gateway and the workers use it; it reads no settings and no environment variables.
Public names live here; see docs/CONTRACTS.md for what each promises.
"""

from service.engine.artifacts import PromptArtifact, load_module
from service.engine.backbones import (
    Backbone,
    BackboneSpec,
    create_backbone,
    list_layers,
    load_checkpoint_state,
)
from service.engine.data import (
    ImageSet,
    LoadedDataset,
    ValidationReport,
    decode_image,
    load_dataset,
    preprocess,
    resolve_dataset_uri,
    split_train_val,
)
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
    MethodConfig,
    PromptModule,
    create_method,
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

__all__ = [
    "ArtifactError",
    "Backbone",
    "BackboneError",
    "BackboneSpec",
    "Checkpoint",
    "DatasetError",
    "EngineError",
    "EpochMetrics",
    "ImageDecodeError",
    "ImageSet",
    "LayerError",
    "LayerInfo",
    "LoadedDataset",
    "MethodConfig",
    "MethodError",
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
