"""PEFT LoRA adapters in and out: `adapter_config.json` + `adapter_model.safetensors` <-> a prompt artifact.

A LoRA prompt's artifact already holds PEFT's own tensor names without the `base_model.model.` prefix
(`lora.<module>.lora_A.weight`), so the conversion is a renaming plus the head: PEFT saves a replaced
classifier listed in `modules_to_save` as `base_model.model.<classifier>.weight` / `.bias`, where
`<classifier>` is the timm model's classifier module (`pretrained_cfg["classifier"]`, e.g. `fc`, `head`).

Import checks what can be checked against the backbone it is meant for, and names what does not fit:
the base model (PEFT's `base_model_name_or_path` and `auto_mapping.base_model_class`, when recorded),
each adapted module (it must exist on the backbone and be one LoRA can serve), each factor's shape, and
the head's width. Export writes the config through peft's own `LoraConfig`, so peft reads it back.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from service.engine.artifacts import PromptArtifact
from service.engine.errors import ArtifactError

if TYPE_CHECKING:
    from service.engine.backbones import Backbone

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: What `PeftModel.save_pretrained` puts before every module name.
PREFIX = "base_model.model."
#: Adapter settings this product serves; an adapter asking for another value is refused by name.
_UNSUPPORTED = {
    "use_dora": False,
    "use_rslora": False,
    "bias": "none",
    "rank_pattern": {},
    "alpha_pattern": {},
    "layer_replication": None,
}
_FACTOR = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")


class AdapterMismatch(ArtifactError):
    """The adapter does not fit the backbone (422): `param` says which part (base_model, target_modules,
    head), the message names the module or model."""


def classifier_name(backbone: Backbone) -> str:
    """The timm model's classifier module name (where PEFT saves a replaced head)."""
    cfg = getattr(backbone.model, "pretrained_cfg", None) or {}
    name = cfg.get("classifier") if isinstance(cfg, Mapping) else getattr(cfg, "classifier", None)
    if not isinstance(name, str) or not name:
        raise ArtifactError(f"backbone {backbone.spec.model!r} names no classifier module in its timm config")
    return name


def read_adapter_zip(data: bytes) -> tuple[bytes, bytes]:
    """(adapter_config.json, adapter_model.safetensors) from a zip of a `save_pretrained` folder (the two
    files at the top or in one folder)."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise ArtifactError(f"not a zip of a PEFT adapter folder: {exc}") from None
    with zf:
        found: dict[str, zipfile.ZipInfo] = {}
        for info in zf.infolist():
            base = info.filename.rsplit("/", 1)[-1]
            if base in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) and not info.is_dir():
                if base in found:
                    raise ArtifactError(f"the zip holds more than one {base}")
                found[base] = info
        missing = [n for n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if n not in found]
        if missing:
            raise ArtifactError(f"the zip lacks {', '.join(missing)} (a PEFT adapter folder has both)")
        return zf.read(found[ADAPTER_CONFIG]), zf.read(found[ADAPTER_WEIGHTS])


def _parse(config_bytes: bytes, weights_bytes: bytes) -> tuple[dict[str, Any], dict[str, Tensor]]:
    try:
        config = json.loads(config_bytes)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{ADAPTER_CONFIG} is not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ArtifactError(f"{ADAPTER_CONFIG} is not a JSON object")
    try:
        tensors = st_load(weights_bytes)
    except Exception as exc:  # any parse failure: the upload is not a safetensors file
        raise ArtifactError(f"{ADAPTER_WEIGHTS} is not a readable safetensors file ({exc})") from None
    return config, tensors


def _check_base_model(config: Mapping[str, Any], backbone: Backbone) -> None:
    model = backbone.spec.model
    named = config.get("base_model_name_or_path")
    if isinstance(named, str) and named:
        short = named.rstrip("/").rsplit("/", 1)[-1].removeprefix("hf-hub:").split(".", 1)[0]
        if short != model:
            raise AdapterMismatch(
                f"the adapter was trained on base model {named!r}, not on this backbone's {model!r}",
                code="base_model_mismatch",
                param="base_model",
            )
    mapping = config.get("auto_mapping") or {}
    wanted = mapping.get("base_model_class") if isinstance(mapping, Mapping) else None
    have = type(backbone.model).__name__
    if isinstance(wanted, str) and wanted and wanted != have:
        raise AdapterMismatch(
            f"the adapter was trained on a {wanted} base model, not on this backbone's {model!r} ({have})",
            code="base_model_mismatch",
            param="base_model",
        )


def _check_settings(config: Mapping[str, Any]) -> None:
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise ArtifactError(f"not a LoRA adapter (peft_type {config.get('peft_type')!r})", param="adapter")
    for key, served in _UNSUPPORTED.items():
        value = config.get(key, served)
        if value not in (served, None) and not (served == {} and not value):
            raise ArtifactError(
                f"adapter setting {key}={value!r} is not served (only {key}={served!r})", param=key
            )
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ArtifactError(
                f"adapter_config.json {key} must be a positive number, got {value!r}", param=key
            )


def from_peft(
    backbone: Backbone,
    config_bytes: bytes,
    weights_bytes: bytes,
    *,
    classes: Sequence[str] | None = None,
) -> PromptArtifact:
    """A LoRA prompt artifact on `backbone` from a PEFT adapter trained elsewhere, with its head.

    Args:
        classes: class names in label order; None = "0", "1", ... for the head's width.

    Raises:
        AdapterMismatch: another base model, a module the backbone lacks or LoRA cannot serve, a factor
            or head of the wrong shape (each named).
        ArtifactError: not a LoRA adapter, unserved settings (DoRA, rank patterns, biases), no head.
    """
    from service.engine.methods import create_method
    from service.engine.methods.lora import LoRAConfig, adaptable

    config, tensors = _parse(config_bytes, weights_bytes)
    _check_settings(config)
    _check_base_model(config, backbone)
    rank, alpha = int(config["r"]), config["lora_alpha"]
    head_name = classifier_name(backbone)
    modules = dict(backbone.model.named_modules())
    factors: dict[str, Tensor] = {}
    head: dict[str, Tensor] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PREFIX)
        if name in (f"{head_name}.weight", f"{head_name}.bias"):
            head[name.rsplit(".", 1)[1]] = tensor
            continue
        match = _FACTOR.match(name)
        if match is None:
            raise AdapterMismatch(
                f"adapter tensor {key!r} is neither a LoRA factor nor the classifier {head_name!r} "
                f"of {backbone.spec.model!r}",
                code="layer_mismatch",
                param="target_modules",
            )
        module = match["module"]
        if module not in modules:
            raise AdapterMismatch(
                f"the adapter adapts layer {module!r}, which backbone {backbone.spec.model!r} does not have",
                code="layer_mismatch",
                param="target_modules",
            )
        if not adaptable(modules[module], backbone.family, module):
            raise AdapterMismatch(
                f"the adapter adapts layer {module!r} ({type(modules[module]).__name__}), which LoRA is not "
                f"served on for backbone {backbone.spec.model!r}",
                code="layer_mismatch",
                param="target_modules",
            )
        factors[f"lora.{module}.lora_{match['factor']}.weight"] = tensor
    if set(head) != {"weight", "bias"}:
        raise ArtifactError(
            f"the adapter has no classifier head: save it with modules_to_save=[{head_name!r}] "
            f"(its weight and bias)",
            code="missing_head",
            param="modules_to_save",
        )
    if not factors:
        raise ArtifactError("the adapter holds no LoRA factors", param="adapter")
    weight = head["weight"]
    if (
        weight.ndim != 2
        or weight.shape[1] != backbone.num_features
        or tuple(head["bias"].shape) != (weight.shape[0],)
    ):
        raise AdapterMismatch(
            f"the adapter's classifier {head_name!r} has shape {tuple(weight.shape)}; backbone "
            f"{backbone.spec.model!r} needs [classes, {backbone.num_features}]",
            code="base_model_mismatch",
            param="base_model",
        )
    k = int(weight.shape[0])
    names = [str(c) for c in classes] if classes is not None else [str(i) for i in range(k)]
    if len(names) != k:
        raise ArtifactError(f"{len(names)} class names for the adapter's {k}-class head", param="classes")
    targets = sorted({key[len("lora.") : -len(".lora_A.weight")] for key in factors}, key=list(modules).index)
    lora_config = LoRAConfig(num_classes=k, lora_rank=rank, lora_alpha=alpha, target_modules=tuple(targets))
    module = create_method("lora", backbone, lora_config)
    try:
        module.load_tensors({"head.weight": weight, "head.bias": head["bias"], **factors})
    except ArtifactError as exc:
        raise AdapterMismatch(str(exc), code="layer_mismatch", param="target_modules") from None
    module.eval()
    return PromptArtifact.from_module(module, classes=names, metrics={"imported_from": "peft"})


def to_peft(artifact: PromptArtifact, backbone: Backbone) -> tuple[bytes, bytes]:
    """(adapter_config.json, adapter_model.safetensors) of a LoRA prompt, as `PeftModel.save_pretrained`
    writes them for the timm model with its classifier replaced by the prompt's head."""
    from peft import LoraConfig

    if artifact.method != "lora":
        raise ArtifactError(f"only LoRA prompts have a PEFT form, not {artifact.method!r}", param="prompt")
    artifact.check_backbone(backbone)
    meta = artifact.metadata
    targets = [str(t) for t in meta.get("lora_targets") or []]
    head_name = classifier_name(backbone)
    config = LoraConfig(
        r=int(meta["lora_rank"]),
        lora_alpha=meta.get("lora_alpha", meta["lora_rank"]),
        lora_dropout=0.0,
        # one anchored pattern: a list would also match other modules ending in the same name
        target_modules="|".join(re.escape(t) for t in targets),
        modules_to_save=[head_name],
        base_model_name_or_path=backbone.spec.model,
        inference_mode=True,
    )
    config_json = json.dumps(config.to_dict(), indent=2, sort_keys=True, default=sorted).encode()
    out: dict[str, Tensor] = {}
    for key, tensor in artifact.tensors.items():
        if key.startswith("lora."):
            out[PREFIX + key[len("lora.") :]] = tensor
    out[f"{PREFIX}{head_name}.weight"] = artifact.tensors["head.weight"]
    out[f"{PREFIX}{head_name}.bias"] = artifact.tensors["head.bias"]
    return config_json, st_save(out)


def to_peft_zip(artifact: PromptArtifact, backbone: Backbone) -> bytes:
    """The two files of `to_peft` in a zip (a `save_pretrained` folder, ready to unpack)."""
    config_json, weights = to_peft(artifact, backbone)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(ADAPTER_CONFIG, config_json)
        zf.writestr(ADAPTER_WEIGHTS, weights)
    return buf.getvalue()
