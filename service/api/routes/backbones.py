"""Backbones: registered by the admin, listed (with their layer catalogs) by anyone with a key."""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.api.deps import AdminDep, ReaderDep, SessionDep
from service.api.routing import CheckedRoute
from service.api.schemas.backbones import BackboneCreate, BackbonePublic, BackboneSummary, LayerPublic
from service.api.schemas.common import ERROR_RESPONSES, ListPublic
from service.db.models import Backbone
from service.domain import backbones
from service.engine import BackboneSpec

router = APIRouter(route_class=CheckedRoute, tags=["backbones"], responses=ERROR_RESPONSES)


def to_spec(body: BackboneCreate) -> BackboneSpec:
    """The body is the spec plus its id: every other field is passed through by name."""
    return BackboneSpec(**body.model_dump(exclude={"id"}))


def _summary(b: Backbone) -> dict[str, object]:
    spec = b.spec or {}
    return {
        "id": b.id,
        "model": b.model,
        "weights": b.weights,
        "family": b.family,
        "input_size": list(spec["input_size"]) if spec.get("input_size") else None,
        "mean": list(spec["mean"]) if spec.get("mean") else None,
        "std": list(spec["std"]) if spec.get("std") else None,
        "num_features": b.num_features,
        "num_layers": len(b.layers),
        "recommended_layer": b.recommended_layer,
        "spec_hash": b.spec_hash,
        "created_at": b.created_at,
    }


def _public(b: Backbone) -> BackbonePublic:
    return BackbonePublic(**_summary(b), layers=[LayerPublic.model_validate(layer) for layer in b.layers])  # type: ignore[arg-type]


@router.post("/v1/backbones", status_code=201, response_model=BackbonePublic)
def register_backbone(body: BackboneCreate, _: AdminDep, session: SessionDep) -> BackbonePublic:
    row = backbones.register_backbone(session, body.id, to_spec(body))
    session.commit()
    return _public(row)


@router.get("/v1/backbones", response_model=ListPublic[BackboneSummary])
def list_backbones(_: ReaderDep, session: SessionDep) -> ListPublic[BackboneSummary]:
    rows = backbones.list_backbones(session)
    return ListPublic[BackboneSummary](data=[BackboneSummary(**_summary(b)) for b in rows], has_more=False)  # type: ignore[arg-type]


@router.get("/v1/backbones/{backbone_id}", response_model=BackbonePublic)
def get_backbone(backbone_id: str, _: ReaderDep, session: SessionDep) -> BackbonePublic:
    return _public(backbones.get_backbone(session, backbone_id))


@router.delete("/v1/backbones/{backbone_id}", status_code=204)
def delete_backbone(backbone_id: str, _: AdminDep, session: SessionDep) -> Response:
    backbones.delete_backbone(session, backbone_id)
    session.commit()
    return Response(status_code=204)
