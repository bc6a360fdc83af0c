from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from service.api.schemas.common import FromRow


class FilePublic(FromRow):
    id: str = Field(description="`file_...`: use it as a job's or an evaluation's `dataset_uri`.")
    object: Literal["file"] = "file"
    filename: str
    bytes: int
    sha256: str = Field(description="Of the stored bytes, computed while they streamed in.")
    status: str = Field(description="`uploaded`: stored whole and a readable archive of its kind.")
    created_at: datetime
