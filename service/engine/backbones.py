"""Frozen backbones: a spec (timm name + weights source + preprocessing) and the shared, staged model.

A `Backbone` is built once per process and device and never changes: eval mode, no gradients, no
parameter ever written. Prompts act on it only from the outside, through `run(..., layer_fn,
norm_fn)`, which is what lets one backbone serve every tenant at once.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import timm
import torch
from torch import nn

import service.engine.models  # noqa: F401  (registers the CIFAR models in timm's registry)
from service.engine.backbone_spec import BackboneSpec
from service.engine.errors import BackboneError, EngineError
from service.engine.layers import (
    Decomposition,
    LayerInfo,
    NormLayerInfo,
    Segment,
    build_catalog,
    decompose,
    recommended_layer,
)
from service.engine.preprocessing import preprocessing_for

log = logging.getLogger(__name__)

LayerFn = Callable[[int, torch.Tensor], torch.Tensor]
NormFn = Callable[[str, torch.Tensor], torch.Tensor]
#: (module name, module input, module output) -> new output: per-row updates of a weight layer (LoRA).
ModuleFn = Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]

#: Prefixes that wrappers (DataParallel, EMA, Lightning) put in front of checkpoint keys.
_KEY_PREFIXES = ("module.", "model.", "_orig_mod.")
_STATE_DICT_KEYS = ("state_dict", "model", "state_dict_ema", "model_state_dict")


def weights_path(uri: str) -> Path:
    """The local path of a `file://` weights URI."""
    parsed = urlparse(uri)
    if parsed.scheme != "file":
        raise BackboneError(f"not a file:// URI: {uri!r}", param="weights")
    return Path(unquote(parsed.path))


def load_checkpoint_state(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors or torch checkpoint and clean its keys (wrapper dicts, `module.` prefixes)."""
    if not path.is_file():
        raise BackboneError(f"weights file not found: {path}", param="weights")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: Any = load_file(str(path))
        else:
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # any reader failure is a bad weights file, not a server error
        raise BackboneError(f"cannot read weights file {path.name}: {exc}", param="weights") from exc
    for key in _STATE_DICT_KEYS:
        if isinstance(raw, Mapping) and key in raw and isinstance(raw[key], Mapping):
            raw = raw[key]
            break
    if not isinstance(raw, Mapping):
        raise BackboneError(f"weights file {path.name} holds no state dict", param="weights")
    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if not isinstance(value, torch.Tensor):
            continue
        for prefix in _KEY_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        state[key] = value
    return state


def _load_file_weights(model: nn.Module, path: Path) -> None:
    state = load_checkpoint_state(path)
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier", "")
    own = model.state_dict()
    # The classifier is replaced by our heads, so a checkpoint trained for other classes still fits.
    state = {
        k: v
        for k, v in state.items()
        if not (classifier and k.startswith(f"{classifier}.") and k in own and own[k].shape != v.shape)
    }
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise BackboneError(f"weights in {path.name} do not fit the model: {exc}", param="weights") from exc
    missing = [k for k in result.missing_keys if not (classifier and k.startswith(f"{classifier}."))]
    if missing or result.unexpected_keys:
        raise BackboneError(
            f"weights in {path.name} do not match the model: missing {missing[:5]}, unexpected "
            f"{list(result.unexpected_keys)[:5]}",
            param="weights",
        )


def _run_segments(
    segments: tuple[Segment, ...],
    pool: Segment,
    h: torch.Tensor,
    start: int,
    stop: int,
    pooled_index: int,
    layer_fn: LayerFn | None,
) -> torch.Tensor:
    for index in range(start + 1, stop + 1):
        if index == pooled_index:
            h = pool(h)
        else:
            h = segments[index - 1](h)
            if layer_fn is not None:
                h = layer_fn(index, h)
    return h


def _norm_kind(module: nn.Module) -> tuple[str, int, int] | None:
    """(kind, num_features, channel_dim) for the norm modules norm-tune adjusts, else None."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "bn", int(module.num_features), 1
    if isinstance(module, nn.GroupNorm):
        return "gn", int(module.num_channels), 1
    if isinstance(module, nn.LayerNorm) and module.normalized_shape:
        channel_dim = 1 if type(module).__name__ == "LayerNorm2d" else -1
        return "ln", int(module.normalized_shape[-1]), channel_dim
    return None


class Backbone:
    """A frozen timm model cut into prompt-layer segments (see `layers.py`)."""

    def __init__(self, spec: BackboneSpec, model: nn.Module, device: torch.device) -> None:
        self.spec = spec
        self.model = model
        self.device = device
        self._decomposition: Decomposition = decompose(model)
        self.family = self._decomposition.family
        self._local = threading.local()
        self._hooked_modules: set[str] = set()
        self.norm_layers: list[NormLayerInfo] = []
        self._install_norm_hooks()
        self.layers: list[LayerInfo] = []
        self._measure()
        self.recommended_layer = recommended_layer(self.layers)
        #: how images become this backbone's input (recorded in every artifact trained on it)
        self.preprocessing = preprocessing_for(spec)
        #: TorchScript traces of the segments and the pooling, for passes nothing rewrites inside a layer
        #: (see `trace_segments`); None until traced
        self._traced: tuple[tuple[Segment, ...], Segment] | None = None
        self._traced_channels_last = False  # the traces want channels-last activations (optimised, CPU)

    @property
    def input_size(self) -> tuple[int, int]:
        assert self.spec.input_size is not None
        return self.spec.input_size

    @property
    def num_layers(self) -> int:
        """L: the last block-output layer (layers are 0..L)."""
        return len(self.layers) - 1

    @property
    def pooled_index(self) -> int:
        return len(self.layers)

    def _install_norm_hooks(self) -> None:
        pending: list[tuple[str, str, int, int]] = []
        for name, module in self.model.named_modules():
            kind = _norm_kind(module)
            if kind is None:
                continue
            pending.append((name, *kind))
            # timm's fused norm+act modules apply the activation inside forward: rewrite the norm's
            # output at the input of their `drop` submodule, i.e. before the activation.
            drop = getattr(module, "drop", None)
            if isinstance(drop, nn.Module) and hasattr(module, "act"):
                drop.register_forward_pre_hook(self._make_pre_hook(name))
            else:
                module.register_forward_hook(self._make_hook(name))
        self._pending_norms = pending

    def _make_hook(self, name: str) -> Callable[..., torch.Tensor | None]:
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
            fn: NormFn | None = getattr(self._local, "norm_fn", None)
            seen = getattr(self._local, "seen", None)
            if seen is not None:
                seen.append(name)
            return fn(name, output) if fn is not None else None

        return hook

    def _make_pre_hook(self, name: str) -> Callable[..., tuple[torch.Tensor] | None]:
        inner = self._make_hook(name)

        def pre_hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor] | None:
            out = inner(module, inputs, inputs[0])
            return None if out is None else (out,)

        return pre_hook

    def hook_modules(self, names: Iterable[str]) -> None:
        """Let `run(module_fn=...)` rewrite the outputs of the named modules (idempotent).

        Installed on demand, not for every module up front: a hook takes a module off PyTorch's fast
        call path, so only the weight layers some resident adapter updates pay for one.
        """
        modules = dict(self.model.named_modules())
        for name in names:
            if name in self._hooked_modules:
                continue
            if name not in modules:
                raise EngineError(f"backbone {self.spec.model!r} has no module {name!r}")
            modules[name].register_forward_hook(self._make_module_hook(name))
            self._hooked_modules.add(name)

    def _make_module_hook(self, name: str) -> Callable[..., torch.Tensor | None]:
        def hook(
            _module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
        ) -> torch.Tensor | None:
            fn: ModuleFn | None = getattr(self._local, "module_fn", None)
            return fn(name, inputs[0], output) if fn is not None else None

        return hook

    @torch.no_grad()
    def _measure(self) -> None:
        """Run one dummy image to learn every layer's shape and which layer each norm sits in."""
        h, w = self.input_size
        x = torch.zeros(1, 3, h, w, device=self.device)
        shapes: list[tuple[int, ...]] = [tuple(x.shape[1:])]
        norm_layer: dict[str, int] = {}
        weight_layer: dict[str, int] = {}
        index = 0

        def record(name: str) -> Callable[..., None]:
            def hook(*_: Any) -> None:  # returns None: the output stays as it is
                weight_layer.setdefault(name, index)

            return hook

        # removed after this one pass: a hook takes a module off PyTorch's fast call path
        handles = [
            module.register_forward_hook(record(name))
            for name, module in self.model.named_modules()
            if isinstance(module, nn.Conv2d | nn.Linear)
        ]
        segments = (*self._decomposition.segments, self._decomposition.pool)
        try:
            for index, segment in enumerate(segments, start=1):  # the hooks read `index`
                self._local.seen = []
                x = segment(x)
                for name in self._local.seen:
                    norm_layer.setdefault(name, index)
                if index <= len(self._decomposition.segments):
                    shapes.append(tuple(x.shape[1:]))
        finally:
            for handle in handles:
                handle.remove()
        self._local.seen = None
        #: conv / linear module name -> the layer (1..L+1) whose segment runs it first; modules the
        #: staged forward never runs (timm's own classifier) are absent
        self.weight_layer = weight_layer
        self.num_features = int(x.shape[-1])
        self.layers = build_catalog(self._decomposition, shapes)
        # Only norms that actually run take part in norm-tune (timm heads may hold unused norms).
        self.norm_layers = [
            NormLayerInfo(name, kind, features, channel_dim, norm_layer[name])
            for name, kind, features, channel_dim in self._pending_norms
            if name in norm_layer
        ]

    def run(
        self,
        h: torch.Tensor,
        start: int,
        stop: int,
        *,
        layer_fn: LayerFn | None = None,
        norm_fn: NormFn | None = None,
        module_fn: ModuleFn | None = None,
    ) -> torch.Tensor:
        """Activation at layer `start` -> activation at layer `stop` (L+1 = pooled features [B, D]).

        `layer_fn(i, h_i)` rewrites every layer i in (start, stop]; `norm_fn(name, y)` rewrites the
        output of every norm module on the way; `module_fn(name, x, y)` the output of every module
        `hook_modules` named. One caller at a time per thread.
        """
        if not 0 <= start <= stop <= self.pooled_index:
            raise ValueError(f"bad run range {start}..{stop} (layers 0..{self.pooled_index})")
        traced = self._traced
        if traced is not None and norm_fn is None and module_fn is None and not torch.is_grad_enabled():
            if self._traced_channels_last:
                h = _channels_last(h)
            return _run_segments(traced[0], traced[1], h, start, stop, self.pooled_index, layer_fn)
        decomposition = self._decomposition
        self._local.norm_fn = norm_fn
        self._local.module_fn = module_fn
        try:
            h = _run_segments(
                decomposition.segments, decomposition.pool, h, start, stop, self.pooled_index, layer_fn
            )
        finally:
            self._local.norm_fn = None
            self._local.module_fn = None
        return h

    def trace_segments(self, batch_sizes: tuple[int, ...] = (1, 3), *, optimise: bool = False) -> bool:
        """Trace every segment and the pooling with TorchScript, for inference passes without norm or module
        rewrites (activation and input prompts, the bare backbone); returns whether the traces are in use.

        Why: a traced segment runs its whole chain of ops in one call that holds the GIL once, where eager
        PyTorch takes and releases it around every op. The serving engine runs one pass per core on
        threads of one process, beside its event loop; on a 2-core CPU the traced ResNet-20 passed 1.2x the
        rows of the eager one (two threads, batches of 3-6). Deprecated in recent PyTorch (torch.compile's
        replacement needs a compiler and minutes per shape), hence the fallback: a model whose trace fails
        or differs keeps the eager path.

        By default the traces run the same ATen ops as the eager segments and are used only once they
        reproduce them exactly, bit for bit, at every size of `batch_sizes`, run enough times to pass
        TorchScript's profiling runs. ``optimise`` trades that exactness for fewer cycles per row: each
        module segment is frozen (`torch.jit.freeze` folds every inference-mode norm into the convolution
        before it) and, on a CPU, traced from a channels-last copy of its weights with channels-last
        activations (oneDNN's faster layout for convolutions; the eager modules keep theirs). On ResNet-20,
        one thread, 4-32 rows: ~1.0 ms per row traced, ~0.9 folded, ~0.75 folded and channels-last. The
        rounding differs from eager PyTorch's, so optimised traces are used only while they stay within
        ``OPTIMISED_TOLERANCE`` of the eager segments, relative to the largest output.
        """
        shapes = [layer.shape for layer in self.layers]
        segments = self._decomposition.segments
        channels_last = optimise and self.device.type == "cpu"
        try:
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TorchScript's deprecation and tracer warnings
                gen = torch.Generator(device="cpu").manual_seed(0)

                def example(i: int, n: int) -> torch.Tensor:
                    x = torch.randn(n, *shapes[i], generator=gen).to(self.device)
                    return _channels_last(x) if channels_last else x

                traced = tuple(
                    _trace(seg, example(i, 2), optimise=optimise, channels_last=channels_last)
                    for i, seg in enumerate(segments)
                )
                pool = torch.jit.trace(self._decomposition.pool, example(len(segments), 2), check_trace=False)
                for n in batch_sizes:
                    x = example(0, n)
                    want = _run_segments(
                        segments, self._decomposition.pool, x, 0, self.pooled_index, self.pooled_index, None
                    )
                    for _ in range(3):  # past TorchScript's profiling runs, onto the optimised graph
                        got = _run_segments(traced, pool, x, 0, self.pooled_index, self.pooled_index, None)
                        if not _reproduces(got, want, OPTIMISED_TOLERANCE if optimise else 0.0):
                            log.warning(
                                "%s: traced segments differ from eager ones; serving eager", self.spec.model
                            )
                            return False
        except Exception as exc:  # a model TorchScript cannot trace: the eager segments serve it
            log.warning(
                "%s: segments not traced (%s: %s); serving eager", self.spec.model, type(exc).__name__, exc
            )
            return False
        self._traced = (traced, pool)
        self._traced_channels_last = channels_last
        return True

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features of normalised images [B, 3, H, W] -> [B, D]."""
        return self.run(x, 0, self.pooled_index)

    def parameter_fingerprint(self) -> str:
        """sha256 over every parameter and buffer: proof that training left the backbone untouched."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()


#: how far optimised traces may stray from the eager segments, relative to the largest pooled feature
#: (float32 rounding of folded weights and another convolution layout stays near 1e-6 of it; anything
#: near 1e-4 is a real difference)
OPTIMISED_TOLERANCE = 1e-4


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def _trace(segment: Segment, example: torch.Tensor, *, optimise: bool, channels_last: bool) -> Segment:
    """One segment's trace; optimised: frozen (norms folded), from a channels-last copy of its weights."""
    if not (optimise and isinstance(segment, nn.Module)):  # a plain function has no module to freeze
        return torch.jit.trace(segment, example, check_trace=False)
    if channels_last:
        segment = copy.deepcopy(segment).to(memory_format=torch.channels_last)
    return torch.jit.freeze(torch.jit.trace(segment.eval(), example, check_trace=False))


def _reproduces(got: torch.Tensor, want: torch.Tensor, tolerance: float) -> bool:
    """Bit for bit when ``tolerance`` is 0; else within ``tolerance`` of the largest magnitude in ``want``."""
    if tolerance == 0.0:
        return torch.equal(got, want)
    scale = float(want.abs().max()) if want.numel() else 0.0
    return got.shape == want.shape and bool(((got - want).abs() <= tolerance * max(scale, 1e-12)).all())


def resolve_device(device: str | torch.device) -> torch.device:
    """`auto` = CUDA when present, else CPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackboneError("device 'cuda' was requested but CUDA is not available", param="device")
    return torch.device(device)


def create_backbone(spec: BackboneSpec, device: str | torch.device = "cpu") -> Backbone:
    """Build the frozen, staged backbone a spec describes.

    Raises:
        BackboneError: unknown model, unreachable hub weights, unreadable or mismatching checkpoint.
    """
    resolved = spec.resolved()
    target = resolve_device(device)
    kwargs = dict(resolved.model_kwargs)
    try:
        # `random` must give the same network in every process (a gateway serves what a worker
        # trained), so its initialisation is seeded from the spec hash, leaving the global RNG alone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(resolved.spec_hash()[:8], 16))
            model = timm.create_model(resolved.model, pretrained=resolved.weights == "hub", **kwargs)
    except EngineError:
        raise
    except Exception as exc:  # timm raises RuntimeError/TypeError/OSError for bad names, kwargs, downloads
        raise BackboneError(f"cannot create {resolved.model!r} (weights={resolved.weights}): {exc}") from exc
    if resolved.weights.startswith("file://"):
        _load_file_weights(model, weights_path(resolved.weights))
    model.eval()
    model.requires_grad_(False)
    model.to(target)
    return Backbone(resolved, model, target)


def list_layers(backbone: Backbone) -> list[LayerInfo]:
    """The prompt-layer catalog of a backbone (index 0..L)."""
    return list(backbone.layers)
