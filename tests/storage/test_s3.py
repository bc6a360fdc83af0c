"""The S3 storage against a real S3-protocol server (moto's standalone server on 127.0.0.1, no mocks):
multipart uploads that appear whole or not at all, reads through a sha256-keyed cache on another "node",
an object store that stops answering mid-upload, and the settings that keep tenants out of it."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from pydantic import ValidationError

from service.settings import Settings
from service.storage import ObjectMissing, StorageUnavailable
from service.storage.s3 import S3Location, S3Storage
from tests.conftest import PrivateS3, s3_client

MIB = 1 << 20


def storage_settings(url: str, bucket: str, var_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "storage_url": f"s3://{bucket}/uploads",
        "s3_endpoint_url": url,
        "s3_region": "us-east-1",
        "storage_part_bytes": 5 * MIB,
        "var_dir": var_dir,
    }
    values.update(overrides)
    return Settings(**values)


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(f"actprompt_object_cache_{name}_total", labels) or 0.0


def _uploads(client: Any, bucket: str) -> list[dict[str, Any]]:
    return list(client.list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def _objects(client: Any, bucket: str) -> list[str]:
    return [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]


def _wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_a_multipart_upload_appears_whole_only_on_commit_and_reads_back_on_another_node(
    s3_url: str, s3_bucket: str, tmp_path: Path
) -> None:
    api = S3Storage.from_settings(storage_settings(s3_url, s3_bucket, tmp_path / "api"))
    data = os.urandom(11 * MIB + 123)
    writer = api.writer("tenant/file_1.zip")
    for i in range(0, len(data), MIB):
        writer.write(data[i : i + MIB])
    raw = s3_client(s3_url)
    assert _objects(raw, s3_bucket) == []  # two parts sent, nothing visible
    assert [u["Key"] for u in _uploads(raw, s3_bucket)] == ["uploads/tenant/file_1.zip"]
    writer.commit()
    head = raw.head_object(Bucket=s3_bucket, Key="uploads/tenant/file_1.zip")
    assert head["ContentLength"] == len(data) and head["ETag"].endswith('-3"')  # 5 + 5 + 1 MiB parts
    assert _uploads(raw, s3_bucket) == []
    sha = hashlib.sha256(data).hexdigest()
    assert writer.sha256() == sha and writer.bytes_written == len(data)
    # the API kept what it streamed (write-through): checking the archive costs no download
    assert (tmp_path / "api" / "cache" / "objects" / f"{sha}.zip").read_bytes() == data

    worker = S3Storage.from_settings(storage_settings(s3_url, s3_bucket, tmp_path / "worker"))
    misses, hits = _sample("requests", result="miss"), _sample("requests", result="hit")
    downloaded = REGISTRY.get_sample_value("actprompt_storage_bytes_total", {"direction": "download"}) or 0
    path = worker.local_path("tenant/file_1.zip", sha)
    assert path == tmp_path / "worker" / "cache" / "objects" / f"{sha}.zip"
    assert path.read_bytes() == data
    assert worker.exists("tenant/file_1.zip")
    worker.delete("tenant/file_1.zip")
    assert not worker.exists("tenant/file_1.zip")
    assert worker.local_path("tenant/file_1.zip", sha) == path  # a cache hit needs no store
    assert _sample("requests", result="miss") == misses + 1 and _sample("requests", result="hit") == hits + 1
    assert REGISTRY.get_sample_value(
        "actprompt_storage_bytes_total", {"direction": "download"}
    ) == downloaded + len(data)
    with pytest.raises(ObjectMissing):
        S3Storage.from_settings(storage_settings(s3_url, s3_bucket, tmp_path / "n3")).local_path(
            "tenant/file_1.zip", sha
        )


def test_an_aborted_upload_leaves_no_object_no_parts_and_no_local_copy(
    s3_url: str, s3_bucket: str, tmp_path: Path
) -> None:
    storage = S3Storage.from_settings(storage_settings(s3_url, s3_bucket, tmp_path))
    writer = storage.writer("t/file_2.tar.gz")
    writer.write(os.urandom(6 * MIB))
    raw = s3_client(s3_url)
    assert len(_uploads(raw, s3_bucket)) == 1
    writer.abort()
    _wait_until(lambda: _uploads(raw, s3_bucket) == [], 10, "the upload to be aborted")
    assert _objects(raw, s3_bucket) == []
    assert [p.name for p in (tmp_path / "cache" / "objects").iterdir() if p.name != ".lock"] == []


def test_bytes_that_changed_in_the_bucket_are_refused(s3_url: str, s3_bucket: str, tmp_path: Path) -> None:
    storage = S3Storage.from_settings(storage_settings(s3_url, s3_bucket, tmp_path / "a"))
    writer = storage.writer("t/file_3.npz")
    writer.write(b"original bytes")
    writer.commit()
    s3_client(s3_url).put_object(Bucket=s3_bucket, Key="uploads/t/file_3.npz", Body=b"tampered bytes")
    other = S3Storage.from_settings(storage_settings(s3_url, s3_bucket, tmp_path / "b"))
    with pytest.raises(ObjectMissing, match="changed since its upload"):
        other.local_path("t/file_3.npz", writer.sha256())
    assert [p.name for p in (tmp_path / "b" / "cache" / "objects").iterdir() if p.name != ".lock"] == []


def test_a_store_that_stops_answering_mid_upload_fails_fast_and_nothing_is_left(
    private_s3: PrivateS3, tmp_path: Path
) -> None:
    raw = private_s3.client()
    raw.create_bucket(Bucket="uploads-down")
    settings = storage_settings(
        private_s3.url, "uploads-down", tmp_path, s3_timeout_seconds=1.0, s3_max_attempts=1
    )
    storage = S3Storage.from_settings(settings)
    writer = storage.writer("t/file_4.zip")
    writer.write(os.urandom(5 * MIB))  # part 1 sent
    private_s3.stop()
    try:
        started = time.monotonic()
        with pytest.raises(StorageUnavailable):
            writer.write(os.urandom(5 * MIB))
        assert time.monotonic() - started < 10
        writer.abort()  # returns at once; the store is cleaned up once it answers again
        with pytest.raises(StorageUnavailable):
            storage.local_path("t/other.zip", "0" * 64)
    finally:
        private_s3.resume()
    _wait_until(lambda: _uploads(raw, "uploads-down") == [], 30, "the upload to be aborted after the outage")
    assert _objects(raw, "uploads-down") == []


def test_a_store_that_is_gone_refuses_at_once_and_serves_again_once_restarted(
    private_s3: PrivateS3, tmp_path: Path
) -> None:
    private_s3.client().create_bucket(Bucket="uploads-gone")
    storage = S3Storage.from_settings(
        storage_settings(private_s3.url, "uploads-gone", tmp_path, s3_timeout_seconds=1.0, s3_max_attempts=2)
    )
    private_s3.kill()
    started = time.monotonic()
    writer = storage.writer("t/file_5.zip")
    writer.write(b"small")
    with pytest.raises(StorageUnavailable, match="unreachable"):
        writer.commit()
    writer.abort()
    assert time.monotonic() - started < 10
    private_s3.restart()
    private_s3.client().create_bucket(Bucket="uploads-gone")  # moto keeps buckets in memory only
    writer = storage.writer("t/file_5.zip")
    writer.write(b"small")
    writer.commit()
    assert storage.exists("t/file_5.zip")


def test_settings_refuse_bad_urls_and_dataset_prefixes_that_reach_the_uploads(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="not an s3"):
        Settings(storage_url="https://bucket/x")
    with pytest.raises(ValidationError, match="overlap"):
        Settings(storage_url="s3://shared/uploads", dataset_s3_prefixes="s3://other/x, s3://shared")
    with pytest.raises(ValidationError, match="overlap"):
        Settings(storage_url="s3://shared/uploads", dataset_s3_prefixes="s3://shared/uploads/t1")
    ok = Settings(storage_url="s3://shared/uploads", dataset_s3_prefixes="s3://shared/datasets/,s3://pub")
    assert [str(loc) for loc in ok.dataset_s3_locations] == ["s3://shared/datasets", "s3://pub/"]
    data = S3Location.parse("s3://shared/data")
    assert data.contains(S3Location.parse("s3://shared/data/a.zip"))
    assert not data.contains(S3Location.parse("s3://shared/database/a.zip"))
    assert not data.contains(S3Location.parse("s3://other/data/a.zip"))
