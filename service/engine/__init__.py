"""The activation-prompt engine: a plain library (torch, timm, numpy, PIL, safetensors only).

Both the gateway and the workers use it; it reads no settings and no environment variables.
"""

from service.engine.backbones import (
    Backbone,
    BackboneSpec,
    create_backbone,
    list_layers,
    load_checkpoint_state,
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
from service.engine.layers import LayerInfo, NormLayerInfo, channel_shape, resolve_prompt_layers

__all__ = [
    "ArtifactError",
    "Backbone",
    "BackboneError",
    "BackboneSpec",
    "DatasetError",
    "EngineError",
    "ImageDecodeError",
    "LayerError",
    "LayerInfo",
    "MethodError",
    "NormLayerInfo",
    "TrainingCancelled",
    "channel_shape",
    "create_backbone",
    "list_layers",
    "load_checkpoint_state",
    "resolve_prompt_layers",
]
