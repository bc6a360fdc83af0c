"""PEFT LoRA adapters as prompts: import one trained elsewhere as a prompt version, export a LoRA prompt.

The engine (`service.engine.peft_adapter`) converts and checks against a loaded backbone; this module
finds the backbone, loads it (the training cache of this process), maps engine errors to 422s naming
the mismatch, and stores the result through the ordinary artifact import.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy.orm import Session

from service.db.models import Prompt
from service.domain.backbones import TRAINING_BACKBONES, get_backbone
from service.domain.errors import InvalidInput, NotFound, from_engine_error
from service.domain.prompts import get_prompt, import_prompt
from service.settings import Settings

#: A zip file's first bytes: an upload starting with them is a PEFT adapter folder, not an artifact.
ZIP_MAGIC = b"PK\x03\x04"


def is_adapter_zip(data: bytes) -> bool:
    return data[:4] == ZIP_MAGIC


def _load_backbone(session: Session, backbone_id: str, settings: Settings) -> Any:
    row = get_backbone(session, backbone_id, param="backbone")
    TRAINING_BACKBONES.max_bytes = settings.training_backbones_bytes
    return TRAINING_BACKBONES.get(dict(row.spec), row.spec_hash, settings.resolved_device())


def parse_classes(raw: str | None) -> list[str] | None:
    """Class names from a form field: a JSON array of strings, or a comma-separated list."""
    if raw is None or not raw.strip():
        return None
    text = raw.strip()
    if text.startswith("["):
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise InvalidInput(f"classes is not a JSON array: {exc}", param="classes") from None
        if not isinstance(value, list) or not all(isinstance(c, str) and c for c in value):
            raise InvalidInput("classes must be an array of non-empty strings", param="classes")
        return value
    names = [c.strip() for c in text.split(",")]
    if not all(names):
        raise InvalidInput("classes has an empty name", param="classes")
    return names


def import_adapter(
    session: Session,
    tenant_id: str,
    settings: Settings,
    *,
    backbone_id: str | None,
    adapter_zip: bytes | None = None,
    adapter_config: bytes | None = None,
    adapter_model: bytes | None = None,
    classes: str | None = None,
    name: str | None = None,
    prompt_id: str | None = None,
) -> Prompt:
    """Store a PEFT LoRA adapter (a zip of its folder, or its two files) as a version of a LoRA prompt.

    Raises:
        InvalidInput: no backbone named, the files missing or unreadable, or an adapter that does not fit
            the backbone (code `base_model_mismatch` or `layer_mismatch`, the message naming it).
        NotFound: an unknown backbone or target prompt.
    """
    from service.engine import EngineError
    from service.engine.peft_adapter import from_peft, read_adapter_zip

    if not backbone_id:
        raise InvalidInput(
            "a PEFT adapter names no registered backbone: give `backbone` (the timm backbone it was "
            "trained on)",
            code="missing_field",
            param="backbone",
        )
    try:
        if adapter_zip is not None:
            adapter_config, adapter_model = read_adapter_zip(adapter_zip)
        if adapter_config is None or adapter_model is None:
            missing = "adapter_config" if adapter_config is None else "adapter_model"
            raise InvalidInput(
                f"the adapter's {missing} file is missing", code="missing_field", param=missing
            )
        backbone = _load_backbone(session, backbone_id, settings)
        artifact = from_peft(backbone, adapter_config, adapter_model, classes=parse_classes(classes))
    except EngineError as exc:
        raise from_engine_error(exc, default_param="adapter") from exc
    return import_prompt(session, tenant_id, artifact.to_bytes(), name=name, prompt_id=prompt_id)


def export_adapter(session: Session, tenant_id: str, ref: str, settings: Settings) -> tuple[str, bytes]:
    """(file name, zip bytes) of a LoRA prompt in PEFT's format: `adapter_config.json` and
    `adapter_model.safetensors`, loadable with `PeftModel.from_pretrained` on the timm model."""
    from service.engine import EngineError
    from service.engine.artifacts import PromptArtifact
    from service.engine.peft_adapter import to_peft_zip

    prompt = get_prompt(session, tenant_id, ref, with_artifact=True)
    if prompt.method != "lora":
        raise InvalidInput(
            f"prompt {ref!r} is a {prompt.method!r} prompt; only LoRA prompts have a PEFT form",
            code="not_a_lora_prompt",
            param="prompt",
        )
    try:
        backbone = _load_backbone(session, prompt.backbone_id, settings)
    except NotFound:
        raise NotFound(
            f"the backbone of prompt {ref!r} is gone", code="backbone_not_found", param="prompt"
        ) from None
    try:
        data = to_peft_zip(PromptArtifact.from_bytes(prompt.artifact), backbone)
    except EngineError as exc:
        raise from_engine_error(exc, default_param="prompt") from exc
    return f"{prompt.prompt_id}@{prompt.version}-peft.zip", data
