"""Shapes every endpoint shares: the error body and a cursor page."""

from __future__ import annotations

from typing import Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")


class FromRow(BaseModel):
    """A response read straight from its ORM row (`Model.model_validate(row)`): no field copied by hand."""

    model_config = ConfigDict(from_attributes=True)


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. `job_not_found`.")
    message: str = Field(description="What went wrong, for humans.")
    param: str | None = Field(
        default=None, description="The request field the error is about, when there is one."
    )


class ErrorBody(BaseModel):
    error: ErrorDetail


class ReadyChecks(BaseModel):
    database: Literal["ok", "down"]
    queue: Literal["ok", "down"]


class Ready(BaseModel):
    status: Literal["ok"]
    checks: ReadyChecks


class NotReady(ErrorBody):
    checks: ReadyChecks


class ListPublic(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool = Field(description="More items after this page.")
    next_cursor: str | None = Field(default=None, description="Pass as `after` to get the next page.")


#: For `responses=` of routes: every error answers with the same body.
ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 413, 422, 429, 503)
}
