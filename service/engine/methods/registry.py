"""One name -> PromptModule class registry, so the API, the CLI and the tests share one method list."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from service.engine.errors import MethodError

if TYPE_CHECKING:
    from service.engine.backbones import Backbone
    from service.engine.methods.base import MethodConfig, PromptModule

_REGISTRY: dict[str, type[PromptModule]] = {}

T = TypeVar("T", bound="type[PromptModule]")


def register_method(name: str) -> Callable[[T], T]:
    """Class decorator: make `cls` creatable as `create_method(name, ...)`.

    Raises:
        ValueError: if the name is already taken (two modules claiming one name is a bug), or `cls` has
            no config class of its own (`config_class.method` must be `name`).
    """

    def decorator(cls: T) -> T:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method {name!r} registered twice")
        tag = cls.config_class.method
        if tag != name:
            raise ValueError(
                f"method {name!r} needs its own config class tagged {name!r} "
                f"(it has {cls.config_class.__name__}, tagged {tag!r})"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def get_method_class(name: str) -> type[PromptModule]:
    """The class registered under `name`; MethodError naming the known methods otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise MethodError(f"unknown method {name!r}; known methods: {known}") from None


def get_config_class(name: str) -> type[MethodConfig]:
    """The config class of method `name` (its options); MethodError naming the known methods otherwise."""
    return get_method_class(name).config_class


def config_classes() -> list[type[MethodConfig]]:
    """The config class of every registered method, in registration order."""
    return [cls.config_class for cls in _REGISTRY.values()]


def create_method(name: str, backbone: Backbone, config: MethodConfig) -> PromptModule:
    """Build the trainable part of method `name` for `backbone` (zero-initialised prompts, fresh head).

    Raises:
        MethodError: unknown method or a config the method cannot use.
        LayerError: a prompt layer outside the backbone's catalog.
    """
    return get_method_class(name)(backbone, config)


def list_methods(servable_only: bool = False) -> list[str]:
    """Registered method names in registration order; `servable_only` drops those that copy the backbone."""
    return [n for n, cls in _REGISTRY.items() if cls.servable or not servable_only]
