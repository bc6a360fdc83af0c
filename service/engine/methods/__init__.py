"""Adaptation methods: AP (the product) and the baselines it is compared with, all in one registry.

Each method has its own frozen config dataclass (PEFT style: `ActivationConfig`, `LoRAConfig`, ...),
a `MethodConfig` subclass tagged with the method's name. Importing this package registers every method,
in this order: activation, input, linear, norm, full,
deep_activation_norm, lora.
"""

# isort: off
from service.engine.methods import activation  # noqa: F401  (registers "activation")
from service.engine.methods import input_prompt  # noqa: F401  (registers "input")
from service.engine.methods import linear  # noqa: F401  (registers "linear")
from service.engine.methods import norm  # noqa: F401  (registers "norm")
from service.engine.methods import full  # noqa: F401  (registers "full")
from service.engine.methods import deep_activation_norm  # noqa: F401  (registers "deep_activation_norm")
from service.engine.methods import lora  # noqa: F401  (registers "lora")

# isort: on
from service.engine.methods.activation import PROMPT_SHAPES, ActivationConfig
from service.engine.methods.base import MethodConfig, PromptModule, norm_layer_segments
from service.engine.methods.deep_activation_norm import DeepActivationNormConfig
from service.engine.methods.full import FullConfig
from service.engine.methods.input_prompt import INPUT_VARIANTS, InputPromptConfig
from service.engine.methods.linear import LinearConfig
from service.engine.methods.lora import LoRAConfig
from service.engine.methods.norm import NormConfig
from service.engine.methods.registry import (
    create_method,
    get_config_class,
    get_method_class,
    list_methods,
    register_method,
)

__all__ = [
    "INPUT_VARIANTS",
    "PROMPT_SHAPES",
    "ActivationConfig",
    "DeepActivationNormConfig",
    "FullConfig",
    "InputPromptConfig",
    "LinearConfig",
    "LoRAConfig",
    "MethodConfig",
    "NormConfig",
    "PromptModule",
    "create_method",
    "get_config_class",
    "get_method_class",
    "list_methods",
    "norm_layer_segments",
    "register_method",
]
