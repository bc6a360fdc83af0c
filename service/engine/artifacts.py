"""The trained prompt as one immutable blob: safetensors tensors + JSON metadata in the header.

Kilobytes for AP / VP / linear / norm (the backbone is referenced by its spec hash, never copied), so
the database can hold it and the serving cache can move it. `from_bytes` and `check_backbone` turn
every way an artifact can be wrong into an ArtifactError with a message a user can act on.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from service.engine.errors import ArtifactError, EngineError
from service.engine.preprocessing import Preprocessing

if TYPE_CHECKING:
    from service.engine.backbones import Backbone
    from service.engine.methods.base import MethodConfig, PromptModule

#: Bumped when the tensor names or metadata keys change incompatibly.
FORMAT_VERSION = 1
#: The safetensors header metadata is str -> str; ours is one JSON document under this key.
METADATA_KEY = "actprompt"
_REQUIRED = ("format_version", "backbone", "spec_hash", "method", "method_config", "classes")


class PromptArtifact:
    """Tensors (prompt + head) and metadata (backbone, method, layers, classes, preprocessing, metrics)."""

    def __init__(self, tensors: Mapping[str, Tensor], metadata: Mapping[str, Any]) -> None:
        self.tensors: dict[str, Tensor] = {
            k: v.detach().to("cpu").contiguous() for k, v in sorted(tensors.items())
        }
        self.metadata: dict[str, Any] = dict(metadata)
        self._bytes: bytes | None = None

    # --- construction --------------------------------------------------------------------------------
    @classmethod
    def from_module(
        cls,
        module: PromptModule,
        *,
        classes: Sequence[str],
        metrics: Mapping[str, Any] | None = None,
        created_at: str | None = None,
    ) -> PromptArtifact:
        """Freeze a trained PromptModule into an artifact bound to its backbone's spec."""
        bb = module.backbone
        spec = bb.spec
        layers = module.prompt_layers
        if len(classes) != module.config.num_classes:
            raise ArtifactError(f"{len(classes)} class names for a {module.config.num_classes}-class head")
        meta: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "backbone": spec.to_dict(),
            "spec_hash": spec.spec_hash(),
            "method": module.name,
            "method_config": module.config.to_dict(),
            "prompt_layers": list(layers),
            "prompt_layer_names": [bb.layers[i].name for i in layers],
            "first_layer": module.first_layer,
            "num_features": bb.num_features,
            "classes": list(classes),
            "num_classes": len(classes),
            "preprocessing": bb.preprocessing.to_dict(),
            "trainable_params": module.num_trainable(),
            "metrics": dict(metrics or {}),
            "created_at": created_at or datetime.now(UTC).isoformat(timespec="seconds"),
            **module.metadata(),
        }
        return cls(module.export_tensors(), meta)

    # --- serialisation -------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """safetensors bytes; deterministic for equal tensors and metadata."""
        if self._bytes is None:
            header = {METADATA_KEY: json.dumps(self.metadata, sort_keys=True)}
            self._bytes = st_save(self.tensors, metadata=header)
        return self._bytes

    @classmethod
    def from_bytes(cls, data: bytes, *, expected_sha256: str | None = None) -> PromptArtifact:
        """Parse and validate an artifact.

        Raises:
            ArtifactError: not safetensors, no actprompt metadata, unknown format version, missing
                keys, or a sha256 other than `expected_sha256`.
        """
        if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
            raise ArtifactError("artifact bytes do not match their sha256 (corrupt or altered)")
        try:
            (header_len,) = struct.unpack("<Q", data[:8])
            header = json.loads(data[8 : 8 + header_len])
            meta_json = header.get("__metadata__", {}).get(METADATA_KEY)
            tensors = st_load(data)
        except Exception as exc:  # any parse failure means the bytes are not a valid artifact
            raise ArtifactError(f"corrupt artifact: not a readable safetensors file ({exc})") from None
        if meta_json is None:
            raise ArtifactError("not an actprompt artifact: the safetensors header has no actprompt metadata")
        try:
            metadata = json.loads(meta_json)
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"corrupt artifact metadata: {exc}") from None
        if not isinstance(metadata, dict):
            raise ArtifactError("corrupt artifact metadata: not a JSON object")
        missing = [k for k in _REQUIRED if k not in metadata]
        if missing:
            raise ArtifactError(f"artifact metadata lacks {', '.join(missing)}")
        if metadata["format_version"] != FORMAT_VERSION:
            raise ArtifactError(
                f"artifact format version {metadata['format_version']} is not supported "
                f"(this engine reads version {FORMAT_VERSION})"
            )
        art = cls(tensors, metadata)
        art._bytes = bytes(data)
        return art

    # --- views ---------------------------------------------------------------------------------------
    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data (what a cache holding it costs)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def method(self) -> str:
        return str(self.metadata["method"])

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.metadata["classes"]]

    @property
    def num_classes(self) -> int:
        return len(self.metadata["classes"])

    @property
    def prompt_layers(self) -> tuple[int, ...]:
        return tuple(int(i) for i in self.metadata.get("prompt_layers", ()))

    @property
    def spec_hash(self) -> str:
        return str(self.metadata["spec_hash"])

    @property
    def method_config(self) -> MethodConfig:
        from service.engine.methods.base import MethodConfig

        try:
            # the artifact's method tags configs written before the config carried its own tag
            return MethodConfig.from_dict(self.metadata["method_config"], method=self.method)
        except (KeyError, TypeError, ValueError, EngineError) as exc:
            raise ArtifactError(f"artifact has an invalid method_config: {exc}") from None

    # --- checks --------------------------------------------------------------------------------------
    def check_backbone(self, backbone: Backbone) -> None:
        """Raise ArtifactError unless this artifact was trained on exactly `backbone` (spec hash)."""
        have = backbone.spec.spec_hash()
        if have != self.spec_hash:
            trained = self.metadata.get("backbone", {})
            raise ArtifactError(
                f"artifact was trained on backbone {trained.get('model')!r} "
                f"(weights {trained.get('weights')!r}, spec hash {self.spec_hash[:12]}), "
                f"not on {backbone.spec.model!r} (weights {backbone.spec.weights!r}, spec hash {have[:12]})"
            )
        head = self.tensors.get("head.weight")
        if head is None or tuple(head.shape) != (self.num_classes, backbone.num_features):
            raise ArtifactError("artifact head does not match its classes and the backbone's feature width")

    def preprocessing(self, backbone: Backbone) -> Preprocessing:
        """The image pipeline this artifact was trained with, to serve and evaluate it with exactly that.

        An artifact without the record keeps `resize` at the backbone's input size, mean and std."""
        record = self.metadata.get("preprocessing")
        if isinstance(record, dict) and record.get("input_size") and record.get("mean") and record.get("std"):
            return Preprocessing.from_dict(record)
        spec = backbone.spec.resolved()
        if spec.input_size is None or spec.mean is None or spec.std is None:
            raise ArtifactError("the backbone has no input size, mean and std to preprocess with")
        return Preprocessing(spec.input_size, spec.mean, spec.std)

    def __repr__(self) -> str:
        return (
            f"PromptArtifact(method={self.method!r}, layers={self.prompt_layers}, "
            f"classes={self.num_classes}, bytes={self.nbytes})"
        )


def load_module(artifact: PromptArtifact, backbone: Backbone) -> PromptModule:
    """Rebuild the PromptModule an artifact was exported from, on `backbone`, in eval mode.

    Raises:
        ArtifactError: wrong backbone, unknown method, or tensors that do not fit.
    """
    from service.engine.methods import create_method

    artifact.check_backbone(backbone)
    try:
        module = create_method(artifact.method, backbone, artifact.method_config)
    except EngineError as exc:
        if isinstance(exc, ArtifactError):
            raise
        raise ArtifactError(f"artifact cannot be rebuilt: {exc}") from None
    module.load_tensors(artifact.tensors)
    module.eval()
    return module
