"""Adaptation methods: AP (the product) and the baselines it is compared with, all in one registry.

Importing this package registers every method, in this order: activation, input, linear, norm, full,
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
from service.engine.methods.base import PROMPT_SHAPES, MethodConfig, PromptModule, norm_layer_segments
from service.engine.methods.registry import create_method, get_method_class, list_methods, register_method

__all__ = [
    "PROMPT_SHAPES",
    "MethodConfig",
    "PromptModule",
    "create_method",
    "get_method_class",
    "list_methods",
    "norm_layer_segments",
    "register_method",
]
