"""Uploaded files: names and kinds accepted, the row, tenant-checked lookup, deletion refused while in use.

A job's or an evaluation's `dataset_uri` may be a file id (`file_...`): `is_file_id` tells it from a URI,
`stored_object` names its stored bytes (a foreign id is a 404, like any other tenant's object).
"""

from __future__ import annotations

import tarfile
import zipfile
from pathlib import Path, PurePath

from sqlalchemy.orm import Session

from service.db.base import utcnow
from service.db.ids import new_id
from service.db.models import File
from service.db.repositories import FileRepository
from service.domain.errors import Conflict, InvalidInput, found

#: Dataset archives the loaders read, longest first (the stored object keeps it: loaders dispatch on it).
FILE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip", ".npz")


def is_file_id(uri: str) -> bool:
    return uri.startswith("file_") and ":" not in uri and "/" not in uri


def suffix_of(filename: str) -> str:
    name = filename.lower()
    suffix = next((s for s in FILE_SUFFIXES if name.endswith(s)), None)
    if suffix is None:
        raise InvalidInput(
            f"file {filename!r}: not a dataset archive; use one of {', '.join(FILE_SUFFIXES)}",
            code="unsupported_file_type",
            param="file",
        )
    return suffix


def clean_filename(filename: str | None) -> str:
    """The last path component (browsers may send a path), without control characters, at most 255 chars."""
    name = PurePath((filename or "").replace("\\", "/")).name
    name = "".join(ch for ch in name if ch.isprintable())[:255]
    if not name:
        raise InvalidInput("the file part needs a filename", code="invalid_file", param="file")
    return name


def new_file_key(tenant_id: str, filename: str) -> tuple[str, str]:
    """(file id, storage key) for an upload; refuses names that are not a dataset archive."""
    file_id = new_id("file")
    return file_id, f"{tenant_id}/{file_id}{suffix_of(filename)}"


def check_archive(path: Path, filename: str) -> None:
    """The bytes are the archive the name says (headers only); the dataset itself is checked by jobs."""
    suffix = suffix_of(filename)
    ok = zipfile.is_zipfile(path) if suffix in (".zip", ".npz") else tarfile.is_tarfile(path)
    if not ok:
        raise InvalidInput(
            f"file {filename!r} is not a valid {suffix} archive", code="invalid_file", param="file"
        )


def record_file(
    session: Session, tenant_id: str, file_id: str, filename: str, key: str, size: int, sha256: str
) -> File:
    row = File(
        id=file_id,
        tenant_id=tenant_id,
        filename=filename,
        bytes=size,
        sha256=sha256,
        storage_key=key,
        status="uploaded",
        created_at=utcnow(),
    )
    return FileRepository(session, tenant_id).add(row)


def get_file(session: Session, tenant_id: str, file_id: str, *, param: str = "file_id") -> File:
    return found(FileRepository(session, tenant_id).get(file_id), "file", file_id, param=param)


def list_files(session: Session, tenant_id: str, *, limit: int, after: str | None) -> list[File]:
    return FileRepository(session, tenant_id).list(limit=limit, after=after)


def delete_file(session: Session, tenant_id: str, file_id: str) -> File:
    """Delete the row (not committed); 409 while an unfinished job or evaluation reads the file.

    The caller removes the stored bytes after the commit, so a rolled-back delete never loses data.
    """
    repo = FileRepository(session, tenant_id)
    row = get_file(session, tenant_id, file_id)
    users = repo.users(file_id)
    if users:
        raise Conflict(
            f"file {file_id} is used by {', '.join(users[:5])}; cancel or wait for them first",
            code="file_in_use",
            param="file_id",
        )
    repo.delete(row)
    return row


def stored_object(session: Session, tenant_id: str, file_id: str) -> tuple[str, str]:
    """(storage key, sha256) of the tenant's file `file_id`, which a job or an evaluation reads.

    Raises:
        NotFound: no such file for this tenant (a foreign id included).
    """
    row = get_file(session, tenant_id, file_id, param="dataset_uri")
    return row.storage_key, row.sha256
