"""Dataset URIs -> a local path the loaders can read.

``file://`` must land (after symlinks) inside one of the configured roots; ``http(s)://`` is fetched
with httpx (its redirect handling and limit) into a cache folder with a byte limit, refusing private,
loopback and link-local addresses: every hop's name is checked after DNS, and the connected socket's
peer again before any request is sent, so DNS rebinding cannot slip through (both through httpcore's
documented `trace` extension). ``s3://`` goes through fsspec when it is installed. Everything else is
refused.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import socket
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import httpx

from service.engine.errors import DatasetError

_CODE = "invalid_dataset_uri"
T = TypeVar("T")
_MAX_REDIRECTS = 5
_CHUNK = 1 << 20
#: Suffixes the loaders dispatch on, longest first, kept on the cached file's name.
_KNOWN_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip", ".npz", ".csv", ".jsonl", ".ndjson")


def _uri_error(message: str) -> DatasetError:
    return DatasetError(message, code=_CODE, param="dataset_uri")


def _resolve_file(uri: str, roots: Sequence[Path]) -> Path:
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise _uri_error(f"file URI with a host ({parts.netloc!r}) is not supported")
    raw = unquote(parts.path)
    if not raw or "\x00" in raw:
        raise _uri_error("file URI has no usable path")
    path = Path(raw).resolve()  # follows symlinks, so a link cannot lead out of a root
    allowed = [Path(r).resolve() for r in roots]
    if not any(path.is_relative_to(root) for root in allowed):
        raise _uri_error(f"{uri} is not under an allowed dataset root")
    if not path.exists():
        raise _uri_error(f"{uri} does not exist")
    return path


def _check_address(host: str, address: str, allow_private: bool) -> None:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if not allow_private and not ip.is_global:
        raise _uri_error(f"host {host!r} resolves to a non-public address ({ip}); refused")


def _check_host(host: str, port: int, allow_private: bool) -> None:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise _uri_error(f"cannot resolve host {host!r}: {exc}") from exc
    for info in infos:
        _check_address(host, str(info[4][0]), allow_private)


def _address_guard(allow_private: bool) -> Callable[[str, dict[str, Any]], None]:
    """An httpcore `trace` hook: checks each new connection's host after DNS, then its connected peer.

    It runs inside the connection pool, on every hop of a redirect chain, before the request is written.
    """

    host = "?"

    def trace(event: str, info: dict[str, Any]) -> None:
        nonlocal host
        if event == "connection.connect_tcp.started":
            host = str(info["host"])
            _check_host(host, int(info["port"]), allow_private)
        elif event == "connection.connect_tcp.complete":
            stream = info["return_value"]
            peer = stream.get_extra_info("server_addr")
            try:
                _check_address(host, str(peer[0]), allow_private)
            except DatasetError:
                stream.close()
                raise

    return trace


def _cache_name(uri: str, content_type: str | None) -> str:
    digest = hashlib.sha256(uri.encode()).hexdigest()[:24]
    name = PurePosixPath(unquote(urlsplit(uri).path)).name.lower()
    suffix = next((s for s in _KNOWN_SUFFIXES if name.endswith(s)), "")
    if not suffix and content_type:
        ct = content_type.split(";")[0].strip().lower()
        suffix = {"application/zip": ".zip", "application/x-tar": ".tar", "application/gzip": ".tar.gz"}.get(
            ct, ""
        )
    return digest + suffix


def _write_limited(chunks: Iterable[bytes], target: Path, max_bytes: int, uri: str) -> Path:
    """Copy at most ``max_bytes`` into ``target`` atomically (a partial download never looks complete)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".part-")
    total = 0
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                total += len(chunk)
                if total > max_bytes:
                    raise _uri_error(f"{uri} is larger than the limit of {max_bytes} bytes")
                out.write(chunk)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _http_get(
    uri: str, *, allow_private: bool, timeout: float, agent: str, consume: Callable[[httpx.Response], T]
) -> T:
    """GET ``uri`` following at most `_MAX_REDIRECTS` redirects, every hop's address checked;
    ``consume`` reads the 200 response as it streams in."""
    trace = _address_guard(allow_private)
    try:
        # trust_env=False: no proxy from the environment, whose own address is all the guard would see.
        with (
            httpx.Client(
                follow_redirects=True,
                max_redirects=_MAX_REDIRECTS,
                timeout=timeout,
                trust_env=False,
                headers={"User-Agent": agent},
            ) as client,
            client.stream("GET", uri, extensions={"trace": trace}) as resp,
        ):
            if resp.status_code != 200:
                raise _uri_error(f"{resp.url} answered HTTP {resp.status_code}")
            return consume(resp)
    except httpx.TooManyRedirects as exc:
        raise _uri_error(f"{uri}: more than {_MAX_REDIRECTS} redirects") from exc
    except httpx.UnsupportedProtocol as exc:
        raise _uri_error(f"{uri} redirected to an unsupported URL: {exc}") from exc
    except httpx.HTTPError as exc:
        raise _uri_error(f"cannot download {uri}: {exc}") from exc


def _check_length(resp: httpx.Response, uri: str, max_bytes: int) -> None:
    length = resp.headers.get("Content-Length")
    if length and length.isdigit() and int(length) > max_bytes:
        raise _uri_error(f"{uri} is {length} bytes, over the limit of {max_bytes}")


def _download_http(uri: str, *, max_bytes: int, cache_dir: Path, allow_private: bool, timeout: float) -> Path:
    def consume(resp: httpx.Response) -> Path:
        _check_length(resp, uri, max_bytes)
        path = cache_dir / _cache_name(uri, resp.headers.get("Content-Type"))
        return _write_limited(resp.iter_bytes(_CHUNK), path, max_bytes, uri)

    return _http_get(
        uri, allow_private=allow_private, timeout=timeout, agent="actprompt-dataset-fetch", consume=consume
    )


def fetch_http_bytes(uri: str, *, max_bytes: int, allow_private: bool = False, timeout: float = 5.0) -> bytes:
    """A small http(s) file into memory (predict by URL) under the download rules: public addresses only
    unless ``allow_private``, at most ``max_bytes``, ``timeout`` seconds per connect and read.

    Raises:
        DatasetError: code ``invalid_dataset_uri`` for a refused scheme, address or size, or a failed fetch.
    """
    if urlsplit(uri).scheme.lower() not in ("http", "https"):
        raise _uri_error(f"unsupported URL {uri!r}; use http(s)://")

    def consume(resp: httpx.Response) -> bytes:
        _check_length(resp, uri, max_bytes)
        data = bytearray()
        for chunk in resp.iter_bytes(_CHUNK):
            data += chunk
            if len(data) > max_bytes:
                raise _uri_error(f"{uri} is larger than the limit of {max_bytes} bytes")
        return bytes(data)

    return _http_get(
        uri, allow_private=allow_private, timeout=timeout, agent="actprompt-image-fetch", consume=consume
    )


def _download_s3(uri: str, *, max_bytes: int, cache_dir: Path) -> Path:
    try:
        import fsspec  # optional: only deployments that read from object stores install it
    except ImportError as exc:
        raise _uri_error("s3:// dataset URIs need the optional package fsspec (with s3fs)") from exc
    path = cache_dir / _cache_name(uri, None)
    try:
        with fsspec.open(uri, "rb") as fh:
            return _write_limited(iter(lambda: fh.read(_CHUNK), b""), path, max_bytes, uri)
    except ImportError as exc:
        raise _uri_error(f"s3:// dataset URIs need s3fs installed beside fsspec: {exc}") from exc
    except (OSError, ValueError) as exc:
        raise _uri_error(f"cannot read {uri}: {exc}") from exc


def resolve_dataset_uri(
    uri: str,
    *,
    roots: Sequence[Path],
    allow_http: bool,
    max_bytes: int,
    cache_dir: Path,
    allow_private: bool = False,
    timeout: float = 30.0,
) -> Path:
    """Map a dataset URI to a local file or folder that :func:`load_dataset` can read.

    Args:
        roots: folders a ``file://`` URI may point into.
        allow_http: whether remote URIs (``http``, ``https``, ``s3``) are allowed at all.
        max_bytes: largest download accepted.
        cache_dir: where downloads are kept (an already downloaded URI is reused).
        allow_private: also fetch from private, loopback and link-local addresses (tests, on-prem).

    Raises:
        DatasetError: code ``invalid_dataset_uri`` for a refused scheme, location, address or size.
    """
    scheme = urlsplit(uri).scheme.lower()
    if scheme == "file":
        return _resolve_file(uri, roots)
    if scheme not in ("http", "https", "s3"):
        raise _uri_error(
            f"unsupported dataset URI scheme {scheme or '(none)'!r}; use file://, http(s):// or s3://"
        )
    if not allow_http:
        raise _uri_error("remote dataset URIs are disabled on this server")
    cached = cache_dir / _cache_name(uri, None)
    if cached.suffix and cached.exists():
        return cached
    if scheme == "s3":
        return _download_s3(uri, max_bytes=max_bytes, cache_dir=cache_dir)
    return _download_http(
        uri, max_bytes=max_bytes, cache_dir=cache_dir, allow_private=allow_private, timeout=timeout
    )
