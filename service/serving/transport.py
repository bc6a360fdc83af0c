"""The wire between fronts and the engine: one msgpack header frame, then one raw frame per tensor.

A message is ``[header, *tensor frames]``. The header is a msgpack map that carries ``"op"``, ``"id"`` and
the op's fields, plus ``"tensors": [[dtype, shape], ...]`` describing the frames that follow. Tensor bytes
are never re-encoded: a contiguous CPU tensor goes out as its own buffer (ZeroMQ sends it without a copy)
and comes in as a tensor over the received frame's buffer (no copy either).

Errors travel as ``{"error": {"code", "message", "param", "status", "retry_after_s"}}`` and are raised again
on the front as the serving error with that code, or an :class:`EngineError` carrying the engine's status.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np
import torch
from torch import Tensor

from service.engine.errors import ActpromptError, EngineError
from service.serving.errors import (
    DeadlineExceededError,
    EngineUnavailableError,
    OverloadedError,
    PinLimitError,
    PromptNotFoundError,
    ServingClosedError,
    ServingError,
)

__all__ = ["decode", "encode", "error_from_wire", "error_to_wire"]

_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.int64)}
#: the dtypes numpy also has: their frames are viewed through numpy, a few microseconds cheaper per tensor
#: than torch's own frombuffer/view/reshape (bfloat16, which numpy lacks, takes torch's way)
_NUMPY_DTYPES = {
    str(d): np.dtype(n)
    for d, n in (
        (torch.float32, "float32"),
        (torch.float16, "float16"),
        (torch.uint8, "uint8"),
        (torch.int64, "int64"),
    )
}

# A received frame is read-only and nobody writes into it, so torch's warning about that says nothing.
# Filtered once here rather than with warnings.catch_warnings() around each frame, which cost tens of
# microseconds per message on both sides of every predict.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)


def encode(header: dict[str, Any], tensors: Sequence[Tensor] = ()) -> list[Any]:
    """Frames for one message; the tensor frames share memory with the (contiguous, CPU) tensors."""
    parts = [_plain(t) for t in tensors]
    header = {**header, "tensors": [[str(t.dtype), list(t.shape)] for t in parts]}
    return [msgpack.packb(header), *(t.view(torch.uint8).numpy().data for t in parts)]


def _plain(t: Tensor) -> Tensor:
    """`t` as a contiguous CPU tensor outside autograd; the usual tensor already is one (no torch call)."""
    if t.requires_grad or t.device.type != "cpu" or not t.is_contiguous():
        return t.detach().cpu().contiguous()
    return t


def decode(frames: Sequence[Any]) -> tuple[dict[str, Any], list[Tensor]]:
    """(header, tensors) from received frames (``bytes`` or ``zmq.Frame``); tensors view the frames."""
    header: dict[str, Any] = msgpack.unpackb(_buffer(frames[0]))
    tensors = []
    for (dtype, shape), frame in zip(header.pop("tensors", []), frames[1:], strict=True):
        buf = _buffer(frame)
        np_dtype = _NUMPY_DTYPES.get(dtype)
        if np_dtype is not None:
            tensors.append(torch.from_numpy(np.frombuffer(buf, dtype=np_dtype).reshape(shape)))
            continue
        flat = torch.frombuffer(buf, dtype=torch.uint8) if len(buf) else torch.empty(0, dtype=torch.uint8)
        tensors.append(flat.view(_DTYPES[dtype]).reshape(shape))
    return header, tensors


def _buffer(frame: Any) -> Any:
    return frame.buffer if hasattr(frame, "buffer") else frame


_BY_CODE: dict[str, type[ServingError]] = {
    cls.code: cls for cls in (PromptNotFoundError, PinLimitError, ServingClosedError, DeadlineExceededError)
}


def error_to_wire(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, ActpromptError):
        return {
            "code": exc.code,
            "message": exc.message,
            "param": exc.param,
            "status": exc.status,
            "retry_after_s": getattr(exc, "retry_after_s", None),
            "excess_s": getattr(exc, "excess_s", None),
            "engine": isinstance(exc, EngineError),
        }
    return {"code": "serving_error", "message": f"{type(exc).__name__}: {exc}", "status": 503}


def error_from_wire(err: dict[str, Any]) -> ActpromptError:
    """The error the engine raised, as the front's code expects to catch it."""
    code, message = str(err.get("code")), str(err.get("message"))
    exc: ActpromptError
    if code == OverloadedError.code:
        retry = float(err.get("retry_after_s") or 1.0)
        excess = None if err.get("excess_s") is None else float(err["excess_s"])
        exc = OverloadedError(message, retry_after_s=retry, excess_s=excess)
    elif code == EngineUnavailableError.code:
        exc = EngineUnavailableError(message)
    elif code in _BY_CODE:
        exc = _BY_CODE[code](message)
    elif err.get("engine"):
        exc = EngineError(message, code=code)
        exc.status = int(err.get("status") or 422)
    else:
        exc = ServingError(message, code=code)
        exc.status = int(err.get("status") or 503)
    if err.get("param") is not None:
        exc.param = str(err["param"])
    return exc
