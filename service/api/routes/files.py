"""Files: upload (multipart, streamed to storage with its sha256, never whole in memory), list, delete."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request, Response
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from service.api.deps import PageDep, ReadTenantDep, SessionDep, SettingsDep, TrainTenantDep
from service.api.routing import CheckedRoute
from service.api.schemas.common import ERROR_RESPONSES, ListPublic
from service.api.schemas.files import FilePublic
from service.db.models import File
from service.domain import files
from service.domain.errors import BadRequest, InvalidInput, PayloadTooLarge
from service.storage import Storage, StorageWriter

router = APIRouter(route_class=CheckedRoute, tags=["files"], responses=ERROR_RESPONSES)

#: Bytes of multipart framing (boundaries, part headers, small fields) allowed beyond `max_file_bytes`.
MULTIPART_SLACK = 64 << 10

_UPLOAD_SCHEMA = {
    "type": "object",
    "required": ["file"],
    "properties": {"file": {"type": "string", "format": "binary", "description": "A dataset archive."}},
}


def file_public(f: File) -> FilePublic:
    return FilePublic.model_validate(f)


def _storage(request: Request) -> Storage:
    storage: Storage = request.app.state.storage
    return storage


class _Upload:
    """multipart callbacks: the part named `file` goes to a storage writer; other fields are ignored."""

    def __init__(self, open_writer: Callable[[str], tuple[str, str, StorageWriter]]) -> None:
        self._open_writer = open_writer
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._in_file = False
        self.pending: list[bytes] = []
        self.file_id: str | None = None
        self.key: str | None = None
        self.filename: str | None = None
        self.writer: StorageWriter | None = None
        self.finished = False

    def callbacks(self) -> Any:
        def on_part_begin() -> None:
            self._headers = {}

        def on_header_field(data: bytes, start: int, end: int) -> None:
            self._header_field += data[start:end]

        def on_header_value(data: bytes, start: int, end: int) -> None:
            self._header_value += data[start:end]

        def on_header_end() -> None:
            self._headers[self._header_field.lower()] = self._header_value
            self._header_field = self._header_value = b""

        def on_headers_finished() -> None:
            _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
            self._in_file = options.get(b"name") == b"file"
            if not self._in_file:
                return
            if self.writer is not None:
                raise InvalidInput("exactly one part named `file`", code="invalid_file", param="file")
            raw = options.get(b"filename")
            self.filename = files.clean_filename(raw.decode("utf-8", "replace") if raw else None)
            self.file_id, self.key, self.writer = self._open_writer(self.filename)

        def on_part_data(data: bytes, start: int, end: int) -> None:
            if self._in_file:
                self.pending.append(data[start:end])

        def on_part_end() -> None:
            self._in_file = False

        def on_end() -> None:
            self.finished = True

        return {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
            "on_end": on_end,
        }


@router.post(
    "/v1/files",
    status_code=201,
    response_model=FilePublic,
    openapi_extra={
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": _UPLOAD_SCHEMA}}}
    },
)
async def upload_file(
    request: Request, tenant_id: TrainTenantDep, session: SessionDep, settings: SettingsDep
) -> FilePublic:
    """Multipart, field `file`; streamed to storage while its sha256 is computed; 413 over the limit.

    The caller is authenticated before a byte of the body is read.
    """
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise InvalidInput(
            "POST /v1/files takes multipart/form-data with a part named `file`",
            code="unsupported_media_type",
            param="file",
        )
    storage = _storage(request)
    limit = settings.max_file_bytes

    def open_writer(filename: str) -> tuple[str, str, StorageWriter]:
        file_id, key = files.new_file_key(tenant_id, filename)
        return file_id, key, storage.writer(key)

    upload = _Upload(open_writer)
    parser = MultipartParser(boundary, upload.callbacks())
    try:
        try:
            async for chunk in request.stream():
                parser.write(chunk)
                if upload.pending and upload.writer is not None:
                    data, upload.pending = b"".join(upload.pending), []
                    if upload.writer.bytes_written + len(data) > limit:
                        raise PayloadTooLarge(
                            f"file is over the limit of {limit} bytes", code="file_too_large", param="file"
                        )
                    await run_in_threadpool(upload.writer.write, data)
            parser.finalize()
        except ValueError as exc:  # python-multipart's framing errors
            raise BadRequest(
                f"malformed multipart body: {exc}", code="invalid_multipart", param="file"
            ) from exc
        if upload.writer is None or upload.filename is None or upload.key is None or upload.file_id is None:
            raise InvalidInput("a part named `file` is required", code="missing_field", param="file")
        if not upload.finished:
            raise BadRequest("the multipart body ended early", code="invalid_multipart", param="file")
        writer, key, filename, file_id = upload.writer, upload.key, upload.filename, upload.file_id
        await run_in_threadpool(writer.commit)
    except BaseException:
        if upload.writer is not None:
            upload.writer.abort()
        raise

    def record() -> FilePublic:
        try:
            files.check_archive(storage.local_path(key, writer.sha256()), filename)
            row = files.record_file(
                session, tenant_id, file_id, filename, key, writer.bytes_written, writer.sha256()
            )
            session.commit()
        except BaseException:
            storage.delete(key)
            raise
        return file_public(row)

    return await run_in_threadpool(record)


@router.get("/v1/files", response_model=ListPublic[FilePublic])
def list_files(tenant_id: ReadTenantDep, session: SessionDep, page: PageDep) -> ListPublic[FilePublic]:
    rows = files.list_files(session, tenant_id, limit=page.fetch, after=page.after)
    return page.answer(rows, lambda f: f.id, file_public)


@router.get("/v1/files/{file_id}", response_model=FilePublic)
def get_file(file_id: str, tenant_id: ReadTenantDep, session: SessionDep) -> FilePublic:
    return file_public(files.get_file(session, tenant_id, file_id))


@router.delete("/v1/files/{file_id}", status_code=204)
def delete_file(file_id: str, request: Request, tenant_id: TrainTenantDep, session: SessionDep) -> Response:
    """409 `file_in_use` while a queued, validating or running job (or an evaluation) reads it."""
    row = files.delete_file(session, tenant_id, file_id)
    key = row.storage_key
    session.commit()
    _storage(request).delete(key)  # after the commit: a failed delete never loses the bytes of a live row
    return Response(status_code=204)
