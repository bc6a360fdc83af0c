"""Prompt versions: references (`prm_x`, `prm_x@3`), artifact import, resolving one for predict."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from service.db.ids import new_id
from service.db.models import Prompt
from service.db.repositories import BackboneRepository, PromptRepository
from service.domain.errors import InvalidInput, NotFound, found, from_engine_error

_REF = re.compile(r"^(?P<id>prm_[0-9a-z]{1,40})(?:@(?P<version>[1-9][0-9]{0,8}))?$")


def parse_ref(ref: str, *, param: str = "prompt") -> tuple[str, int | None]:
    """`prm_x` (latest) or `prm_x@3`; anything else is a 404 (it cannot name a prompt)."""
    match = _REF.match(ref.strip())
    if match is None:
        raise NotFound(f"no prompt {ref!r}", code="prompt_not_found", param=param)
    version = match.group("version")
    return match.group("id"), int(version) if version else None


def get_prompt(
    session: Session, tenant_id: str, ref: str, *, with_artifact: bool = False, param: str = "prompt_id"
) -> Prompt:
    prompt_id, version = parse_ref(ref, param=param)
    prompt = PromptRepository(session, tenant_id).get(prompt_id, version, with_artifact=with_artifact)
    return found(prompt, "prompt", ref, param=param)


def list_prompts(session: Session, tenant_id: str, *, limit: int, after: str | None) -> list[Prompt]:
    return PromptRepository(session, tenant_id).list_latest(limit=limit, after=after)


def list_versions(session: Session, tenant_id: str, prompt_id: str) -> list[Prompt]:
    versions = PromptRepository(session, tenant_id).list_versions(parse_ref(prompt_id, param="prompt_id")[0])
    if not versions:
        raise NotFound(f"no prompt {prompt_id!r}", code="prompt_not_found", param="prompt_id")
    return versions


def delete_prompt(session: Session, tenant_id: str, ref: str) -> int:
    prompt_id, version = parse_ref(ref, param="prompt_id")
    deleted = PromptRepository(session, tenant_id).delete(prompt_id, version)
    if not deleted:
        raise NotFound(f"no prompt {ref!r}", code="prompt_not_found", param="prompt_id")
    return deleted


def store_prompt(
    session: Session,
    tenant_id: str,
    *,
    artifact: bytes,
    backbone_id: str,
    method: str,
    prompt_layers: list[int],
    prompt_shape: str | None,
    classes: list[str],
    metrics: dict[str, Any] | None,
    name: str | None = None,
    job_id: str | None = None,
    prompt_id: str | None = None,
    imported: bool = False,
) -> Prompt:
    """Insert a new prompt, or the next version of `prompt_id` (not committed)."""
    repo = PromptRepository(session, tenant_id)
    pid = prompt_id or new_id("prm")
    row = Prompt(
        prompt_id=pid,
        version=repo.next_version(pid),
        tenant_id=tenant_id,
        backbone_id=backbone_id,
        name=name,
        method=method,
        prompt_layers=list(prompt_layers),
        prompt_shape=prompt_shape,
        classes=list(classes),
        metrics=metrics,
        job_id=job_id,
        sha256=hashlib.sha256(artifact).hexdigest(),
        size_bytes=len(artifact),
        artifact=artifact,
        imported=imported,
    )
    return repo.add(row)


def artifact_backbone_hash(metadata: dict[str, Any]) -> str | None:
    """The backbone spec hash an artifact was trained on (its metadata names it)."""
    for key in ("backbone_hash", "backbone_spec_hash", "spec_hash"):
        if isinstance(metadata.get(key), str):
            return str(metadata[key])
    backbone = metadata.get("backbone")
    if isinstance(backbone, dict):
        for key in ("hash", "spec_hash"):
            if isinstance(backbone.get(key), str):
                return str(backbone[key])
    return None


def import_prompt(
    session: Session, tenant_id: str, data: bytes, *, name: str | None, prompt_id: str | None
) -> Prompt:
    """Store an uploaded artifact; it must decode and match a registered backbone."""
    from service.engine import EngineError
    from service.engine.artifacts import PromptArtifact

    try:
        artifact = PromptArtifact.from_bytes(data)
    except EngineError as exc:
        raise from_engine_error(exc, default_param="artifact") from exc
    except Exception as exc:  # a corrupt upload must be a 422, whatever the parser raised
        raise InvalidInput(
            f"not a prompt artifact: {exc}", code="invalid_artifact", param="artifact"
        ) from exc
    spec_hash = getattr(artifact, "spec_hash", None) or artifact_backbone_hash(artifact.metadata)
    backbones = BackboneRepository(session).find_by_spec_hash(spec_hash) if spec_hash else []
    if not backbones:
        raise InvalidInput(
            "the artifact's backbone is not registered here (register the same model and weights first)",
            code="unknown_backbone",
            param="artifact",
        )
    if prompt_id is not None:
        pid, _ = parse_ref(prompt_id, param="prompt_id")
        if not PromptRepository(session, tenant_id).exists(pid):
            raise NotFound(f"no prompt {prompt_id!r}", code="prompt_not_found", param="prompt_id")
        prompt_id = pid
    if artifact.method not in _servable():
        raise InvalidInput(
            f"method {artifact.method!r} cannot be served", code="invalid_artifact", param="artifact"
        )
    shape = artifact.metadata.get("prompt_shape") or artifact.metadata.get("shape")
    return store_prompt(
        session,
        tenant_id,
        artifact=data,
        backbone_id=backbones[0].id,
        method=artifact.method,
        prompt_layers=[int(i) for i in artifact.prompt_layers],
        prompt_shape=shape if isinstance(shape, str) else None,
        classes=list(artifact.classes),
        metrics=artifact.metadata.get("metrics")
        if isinstance(artifact.metadata.get("metrics"), dict)
        else None,
        name=name,
        prompt_id=prompt_id,
        imported=True,
    )


def _servable() -> list[str]:
    from service.engine.methods import list_methods

    return list(list_methods(servable_only=True))


@dataclass(frozen=True)
class PromptHandle:
    """What the predict path needs, after the tenant-facing reference was resolved and authorised."""

    key: int  # internal key (prompts.key); the serving layer caches by it
    prompt_id: str
    version: int
    sha256: str
    backbone_id: str
    backbone_spec: dict[str, Any]
    backbone_spec_hash: str
    classes: list[str]

    @property
    def ref(self) -> str:
        return f"{self.prompt_id}@{self.version}"


def resolve_for_predict(session: Session, tenant_id: str, ref: str) -> PromptHandle:
    prompt = get_prompt(session, tenant_id, ref, param="prompt")
    backbone = BackboneRepository(session).get(prompt.backbone_id)
    if backbone is None:  # the FK forbids it; guard anyway
        raise NotFound(f"backbone of prompt {ref!r} is gone", code="backbone_not_found", param="prompt")
    return PromptHandle(
        key=prompt.key,
        prompt_id=prompt.prompt_id,
        version=prompt.version,
        sha256=prompt.sha256,
        backbone_id=backbone.id,
        backbone_spec=dict(backbone.spec),
        backbone_spec_hash=backbone.spec_hash,
        classes=list(prompt.classes),
    )


def current_keys(session: Session, refs: Collection[tuple[str, str]]) -> dict[tuple[str, str], int | None]:
    """(tenant, reference) -> the internal key it names now, or None where it names nothing: one query for
    all. A key names an immutable version, so a handle read earlier is still right iff its key is this."""
    parsed = {item: parse_ref(item[1]) for item in refs}
    versions: dict[tuple[str, str], dict[int, int]] = {}
    for tenant_id, prompt_id, version, key in PromptRepository.versions_of(
        session, {pid for pid, _ in parsed.values()}
    ):
        versions.setdefault((tenant_id, prompt_id), {})[version] = key
    out: dict[tuple[str, str], int | None] = {}
    for (tenant_id, ref), (prompt_id, pinned) in parsed.items():
        known = versions.get((tenant_id, prompt_id), {})
        wanted = max(known, default=None) if pinned is None else pinned
        out[(tenant_id, ref)] = known.get(wanted) if wanted is not None else None
    return out


def load_artifact_bytes(session: Session, key: int) -> bytes:
    data = PromptRepository.load_artifact(session, key)
    if data is None:
        raise NotFound("prompt was deleted", code="prompt_not_found", param="prompt")
    return data
