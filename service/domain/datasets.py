"""A dataset reference (`file_...` or a URI) → a local path the loaders read (jobs, evaluations)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from service.domain import files
from service.domain.errors import NotFound
from service.settings import Settings
from service.storage import Storage, create_storage


def resolve_dataset(
    session_factory: sessionmaker[Session],
    tenant_id: str,
    uri: str,
    settings: Settings,
    storage: Storage | None = None,
) -> Path:
    """Uploaded files resolve (tenant-checked) to their stored path; URIs go through the engine's resolver.

    Raises the engine's DatasetError, so a runner reports both kinds of failure the same way.
    """
    from service.engine.data import resolve_dataset_uri
    from service.engine.errors import DatasetError

    if files.is_file_id(uri):
        with session_factory() as session:
            try:
                return files.dataset_path(
                    session, tenant_id, uri, storage or create_storage(settings.files_root)
                )
            except NotFound as exc:
                raise DatasetError(exc.message, code="file_not_found", param="dataset_uri") from exc
    return resolve_dataset_uri(
        uri,
        roots=settings.data_root_paths,
        allow_http=settings.allow_http_datasets,
        max_bytes=settings.max_dataset_bytes,
        cache_dir=settings.cache_dir,
    )
