"""Dataset loading on real files: class folders, archives, manifests, .npz, URIs, splits, preprocessing."""

from __future__ import annotations

import http.server
import io
import json
import struct
import sys
import tarfile
import threading
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service.engine import decode_image, preprocess
from service.engine.data import (
    ImageSet,
    LoadedDataset,
    load_dataset,
    resolve_dataset_uri,
    split_train_val,
)
from service.engine.errors import DatasetError, ImageDecodeError

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
#: Each class gets images of one grey level, so a label mix-up shows in the pixels.
LEVEL = {"cat": 10, "dog": 120, "owl": 240}


def png_bytes(value: int, size: tuple[int, int] = (8, 6), mode: str = "RGB") -> bytes:
    fill: int | tuple[int, ...] = value if mode == "L" else (value,) * len(mode)
    buf = io.BytesIO()
    Image.new(mode, size, fill).save(buf, format="PNG")
    return buf.getvalue()


def make_class_folder(root: Path, per_class: dict[str, int], *, split: str | None = None) -> None:
    for name, count in per_class.items():
        folder = root / split / name if split else root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            (folder / f"{i:03d}.png").write_bytes(png_bytes(LEVEL[name]))


def assert_labels_match_pixels(ds: LoadedDataset, images: ImageSet) -> None:
    """Every image's grey level is the level of the class its label names."""
    for img, label in zip(images.images, images.labels, strict=True):
        assert int(np.asarray(img)[0, 0, 0]) == LEVEL[ds.classes[int(label)]]


# --- decode_image -------------------------------------------------------------------------------


def test_decode_rgb_png() -> None:
    arr = decode_image(png_bytes(77, size=(5, 4)))
    assert arr.dtype == np.uint8 and arr.shape == (4, 5, 3)
    assert (arr == 77).all()


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA"])
def test_decode_converts_to_rgb(mode: str) -> None:
    arr = decode_image(png_bytes(200, mode=mode))
    assert arr.shape == (6, 8, 3)
    assert (arr == 200).all()


@pytest.mark.parametrize("data", [b"", b"not an image at all", png_bytes(5)[:30]])
def test_decode_rejects_garbage(data: bytes) -> None:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data)
    assert info.value.code == "invalid_image"


def _png_claiming(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose header claims another size (Pillow reads the size from it alone)."""
    raw = bytearray(png_bytes(5, size=(1, 1)))
    ihdr = raw.index(b"IHDR")
    raw[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    raw[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(raw[ihdr : ihdr + 17])))
    return bytes(raw)


@pytest.mark.parametrize(
    "side",
    [7_000, 10_000, 14_000],  # over our limit only; over Pillow's warning threshold; over its error one
)
def test_decode_refuses_an_image_bomb_from_its_header(side: int, recwarn: pytest.WarningsRecorder) -> None:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(_png_claiming(side, side))
    assert info.value.code == "invalid_image"
    assert "exceeds" in str(info.value) or "decompression bomb" in str(info.value).lower()


# --- class folders ------------------------------------------------------------------------------


def test_class_folder_with_corrupt_and_stray_files(tmp_path: Path) -> None:
    make_class_folder(tmp_path, {"cat": 3, "dog": 4, "owl": 2})
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.png").write_bytes(png_bytes(1))

    ds = load_dataset(tmp_path)

    assert ds.classes == ["cat", "dog", "owl"]
    assert isinstance(ds.train.images, np.ndarray)
    assert ds.train.images.shape == (9, 6, 8, 3) and ds.train.images.dtype == np.uint8
    assert ds.train.labels.dtype == np.int64
    assert np.bincount(ds.train.labels).tolist() == [3, 4, 2]
    assert_labels_match_pixels(ds, ds.train)
    assert ds.val is None and ds.test is None
    report = ds.report.to_dict()
    assert report["images_per_class"] == {"cat": 3, "dog": 4, "owl": 2}
    assert report["undecodable"] == ["dog/broken.jpg"] and report["num_undecodable"] == 1
    assert report["num_train"] == 9 and report["num_val"] == 0 and report["num_test"] == 0
    assert report["num_classes"] == 3
    assert any("not images" in w for w in report["warnings"])
    json.dumps(report)  # stored on the job as JSON


def test_split_folders(tmp_path: Path) -> None:
    make_class_folder(tmp_path, {"cat": 3, "dog": 3}, split="train")
    make_class_folder(tmp_path, {"cat": 1, "dog": 2}, split="val")
    make_class_folder(tmp_path, {"cat": 2, "dog": 2, "owl": 1}, split="test")

    ds = load_dataset(tmp_path)

    assert ds.classes == ["cat", "dog"]
    assert ds.val is not None and ds.test is not None
    assert (ds.report.num_train, ds.report.num_val, ds.report.num_test) == (6, 3, 4)
    assert_labels_match_pixels(ds, ds.val)
    assert_labels_match_pixels(ds, ds.test)
    assert any("owl" in w for w in ds.report.warnings)  # a test-only class cannot be learned


def test_numeric_class_names_sort_numerically(tmp_path: Path) -> None:
    for name in ["2", "10", "1"]:
        (tmp_path / name).mkdir()
        for i in range(2):
            (tmp_path / name / f"{i}.png").write_bytes(png_bytes(int(name)))
    ds = load_dataset(tmp_path)
    assert ds.classes == ["1", "2", "10"]
    pixels = [int(img[0, 0, 0]) for img in ds.train.images]
    assert [ds.classes[int(label)] for label in ds.train.labels] == [str(p) for p in pixels]
    assert sorted(ds.train.labels.tolist()) == [0, 0, 1, 1, 2, 2]


def test_mixed_sizes_give_a_list(tmp_path: Path) -> None:
    make_class_folder(tmp_path, {"cat": 2, "dog": 2})
    (tmp_path / "dog" / "big.png").write_bytes(png_bytes(LEVEL["dog"], size=(20, 10)))
    ds = load_dataset(tmp_path)
    assert isinstance(ds.train.images, list) and len(ds.train.images) == 5
    x = preprocess(ds.train.images, (16, 16), MEAN, STD)
    assert x.shape == (5, 3, 16, 16)


def test_classes_below_minimum_are_named(tmp_path: Path) -> None:
    make_class_folder(tmp_path, {"cat": 5, "dog": 1, "owl": 2})
    with pytest.raises(DatasetError) as info:
        load_dataset(tmp_path, min_images_per_class=3)
    assert "'dog' (1)" in str(info.value) and "'owl' (2)" in str(info.value)
    assert "'cat'" not in str(info.value)
    assert info.value.code == "invalid_dataset" and info.value.param == "dataset_uri"


def test_single_class_and_empty_folders_fail(tmp_path: Path) -> None:
    make_class_folder(tmp_path / "one", {"cat": 4})
    with pytest.raises(DatasetError, match="at least 2 classes"):
        load_dataset(tmp_path / "one")
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "cat" / "bad.png").write_bytes(b"nope")
    with pytest.raises(DatasetError, match="no decodable training images"):
        load_dataset(tmp_path / "empty")
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "missing")


def test_symlink_out_of_the_dataset_is_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside.png"
    outside.write_bytes(png_bytes(LEVEL["owl"]))
    root = tmp_path / "ds"
    make_class_folder(root, {"cat": 2, "dog": 2})
    (root / "dog" / "link.png").symlink_to(outside)
    ds = load_dataset(root)
    assert ds.report.num_train == 4


# --- archives -----------------------------------------------------------------------------------


def _tree_files(per_class: dict[str, int], prefix: str = "") -> dict[str, bytes]:
    return {
        f"{prefix}{name}/{i:03d}.png": png_bytes(LEVEL[name])
        for name, n in per_class.items()
        for i in range(n)
    }


def write_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def write_tar(path: Path, files: dict[str, bytes], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tf:  # type: ignore[call-overload]
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("suffix,mode", [(".zip", None), (".tar", "w"), (".tar.gz", "w:gz")])
def test_archive_with_wrapper_folder(tmp_path: Path, suffix: str, mode: str | None) -> None:
    files = _tree_files({"cat": 2, "dog": 3}, prefix="mydata/")
    files["mydata/cat/corrupt.png"] = b"\x89PNG broken"
    files["__MACOSX/mydata/cat/._000.png"] = b"resource fork"
    path = tmp_path / f"ds{suffix}"
    write_zip(path, files) if mode is None else write_tar(path, files, mode)

    ds = load_dataset(path)

    assert ds.classes == ["cat", "dog"]
    assert ds.report.num_train == 5
    assert ds.report.undecodable == ["cat/corrupt.png"]
    assert_labels_match_pixels(ds, ds.train)


def test_archive_and_folder_give_the_same_dataset(tmp_path: Path) -> None:
    files = {f"train/{k}": v for k, v in _tree_files({"cat": 2, "dog": 2}).items()}
    files |= {f"test/{k}": v for k, v in _tree_files({"cat": 1, "dog": 1}).items()}
    for name, data in files.items():
        (tmp_path / "folder" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "folder" / name).write_bytes(data)
    a = load_dataset(tmp_path / "folder")
    b = load_dataset(write_zip(tmp_path / "ds.zip", files))
    assert a.classes == b.classes
    assert np.array_equal(a.train.images, b.train.images) and np.array_equal(a.train.labels, b.train.labels)
    assert a.test is not None and b.test is not None and np.array_equal(a.test.labels, b.test.labels)


@pytest.mark.parametrize("evil", ["../escape.png", "ok/../../escape.png", "/abs/escape.png"])
@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_path_traversal_archive_is_refused(tmp_path: Path, evil: str, kind: str) -> None:
    files = _tree_files({"cat": 2, "dog": 2})
    files[evil] = png_bytes(1)
    inner = tmp_path / "work"
    inner.mkdir()
    path = (
        write_zip(inner / "evil.zip", files) if kind == "zip" else write_tar(inner / "evil.tar", files, "w")
    )
    with pytest.raises(DatasetError, match="refusing the archive"):
        load_dataset(path)
    assert not (tmp_path / "escape.png").exists() and not Path("/abs/escape.png").exists()


def test_tar_links_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "links.tar"
    write_tar(path, _tree_files({"cat": 2, "dog": 2}), "w")
    with tarfile.open(path, "a") as tf:
        link = tarfile.TarInfo("cat/passwd.png")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tf.addfile(link)
    ds = load_dataset(path)
    assert ds.report.num_train == 4 and ds.report.num_undecodable == 0


def test_archive_size_bounds(tmp_path: Path) -> None:
    files = _tree_files({"cat": 3, "dog": 3})
    files["cat/huge.png"] = b"\0" * 200_000  # compresses to almost nothing: a small zip bomb
    path = write_zip(tmp_path / "bomb.zip", files)
    assert path.stat().st_size < 20_000
    with pytest.raises(DatasetError, match=r"larger than|more than"):
        load_dataset(path, max_bytes=100_000)
    with pytest.raises(DatasetError, match="members"):
        load_dataset(path, max_members=3)


def test_corrupt_archive(tmp_path: Path) -> None:
    path = tmp_path / "bad.zip"
    path.write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(DatasetError):
        load_dataset(path)


# --- manifests ----------------------------------------------------------------------------------


def _images_beside(root: Path) -> list[tuple[str, str]]:
    rows = []
    for name in ["cat", "dog", "owl"]:
        for i in range(2):
            rel = f"img/{name}_{i}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(png_bytes(LEVEL[name]))
            rows.append((rel, name))
    return rows


def test_csv_manifest_with_header(tmp_path: Path) -> None:
    rows = _images_beside(tmp_path)
    lines = ["path,label"] + [f"{p},{label}" for p, label in rows] + ["img/missing.png,cat"]
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    ds = load_dataset(tmp_path / "data.csv")
    assert ds.classes == ["cat", "dog", "owl"] and ds.report.num_train == 6
    assert ds.report.undecodable == ["img/missing.png"]
    assert_labels_match_pixels(ds, ds.train)


def test_csv_manifest_without_header_and_with_split(tmp_path: Path) -> None:
    rows = _images_beside(tmp_path)
    lines = [f"{p},{label},{'test' if p.endswith('_1.png') else 'train'}" for p, label in rows]
    (tmp_path / "m.csv").write_text("\n".join(lines))
    ds = load_dataset(tmp_path / "m.csv", min_images_per_class=1)
    assert ds.report.num_train == 3 and ds.report.num_test == 3
    assert ds.test is not None
    assert_labels_match_pixels(ds, ds.test)


def test_jsonl_manifest(tmp_path: Path) -> None:
    rows = _images_beside(tmp_path)
    lines = [json.dumps({"path": p, "label": label}) for p, label in rows]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n\n")
    ds = load_dataset(tmp_path / "m.jsonl")
    assert ds.report.images_per_class == {"cat": 2, "dog": 2, "owl": 2}
    assert_labels_match_pixels(ds, ds.train)
    (tmp_path / "bad.jsonl").write_text(lines[0] + "\n{not json\n")
    with pytest.raises(DatasetError, match="line 2"):
        load_dataset(tmp_path / "bad.jsonl")


@pytest.mark.parametrize("escape", ["../outside.png", "/etc/hostname"])
def test_manifest_cannot_point_outside_its_folder(tmp_path: Path, escape: str) -> None:
    (tmp_path / "outside.png").write_bytes(png_bytes(3))
    root = tmp_path / "ds"
    root.mkdir()
    rows = _images_beside(root)
    lines = ["path,label"] + [f"{p},{label}" for p, label in rows] + [f"{escape},cat"]
    (root / "m.csv").write_text("\n".join(lines))
    with pytest.raises(DatasetError, match="outside the manifest"):
        load_dataset(root / "m.csv")


# --- npz ----------------------------------------------------------------------------------------


def test_tiny_npz(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(12, 5, 7, 3), dtype=np.uint8)
    y = np.array([0, 1, 2] * 4, dtype=np.uint8)
    np.savez(
        tmp_path / "d.npz",
        x_train=x,
        y_train=y,
        x_test=x[:3],
        y_test=y[:3],
        classes=np.array(["a", "b", "c"]),
    )
    ds = load_dataset(tmp_path / "d.npz")
    assert ds.classes == ["a", "b", "c"]
    assert np.array_equal(ds.train.images, x) and ds.train.labels.dtype == np.int64
    assert ds.report.images_per_class == {"a": 4, "b": 4, "c": 4}
    assert (ds.report.num_train, ds.report.num_val, ds.report.num_test) == (12, 0, 3)


def test_npz_without_classes_and_grayscale(tmp_path: Path) -> None:
    x = np.zeros((6, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / "g.npz", x_train=x, y_train=np.array([0, 1, 0, 1, 0, 1]))
    ds = load_dataset(tmp_path / "g.npz")
    assert isinstance(ds.train.images, np.ndarray)
    assert ds.classes == ["0", "1"] and ds.train.images.shape == (6, 4, 4, 1)


def test_npz_rejects_bad_content(tmp_path: Path) -> None:
    x = np.zeros((4, 4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "labels.npz", x_train=x, y_train=np.array([0, 1, 2, 5]), classes=np.array(["a", "b"]))
    with pytest.raises(DatasetError, match="outside"):
        load_dataset(tmp_path / "labels.npz")
    np.savez(tmp_path / "nox.npz", y_train=np.array([0, 1]))
    with pytest.raises(DatasetError, match="x_train"):
        load_dataset(tmp_path / "nox.npz")
    obj = np.empty(4, dtype=object)
    np.savez(tmp_path / "pickle.npz", x_train=obj, y_train=np.array([0, 1, 0, 1]))
    with pytest.raises(DatasetError, match="pickle"):
        load_dataset(tmp_path / "pickle.npz")


def test_real_mnist(data_dir: Path) -> None:
    ds = load_dataset(data_dir / "mnist10k.npz")
    assert ds.classes == [str(i) for i in range(10)]
    assert isinstance(ds.train.images, np.ndarray) and ds.train.images.shape == (8000, 28, 28, 1)
    assert ds.test is not None and isinstance(ds.test.images, np.ndarray)
    assert ds.test.images.shape == (2000, 28, 28, 1)
    assert ds.report.num_train == 8000 and sum(ds.report.images_per_class.values()) == 8000
    x = preprocess(ds.train.images[:64], (32, 32), MEAN, STD)
    assert x.shape == (64, 3, 32, 32) and torch.isfinite(x).all()
    # without a resize, undoing the normalisation gives back the source pixels in every channel
    same = preprocess(ds.train.images[:64], (28, 28), MEAN, STD)
    pixels = torch.from_numpy(ds.train.images[:64, :, :, 0]).float() / 255
    assert torch.allclose(same[:, 0] * STD[0] + MEAN[0], pixels, atol=1e-5)
    gray = x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    assert torch.allclose(gray[:, 0], gray[:, 1], atol=1e-5) and torch.allclose(
        gray[:, 0], gray[:, 2], atol=1e-5
    )


# --- split and preprocess -----------------------------------------------------------------------


def _synthetic(n_per_class: list[int]) -> LoadedDataset:
    from service.engine.data import ValidationReport

    labels = np.concatenate([np.full(n, c, dtype=np.int64) for c, n in enumerate(n_per_class)])
    images = np.arange(len(labels), dtype=np.uint8).reshape(-1, 1, 1, 1).repeat(2, 1)
    classes = [f"c{i}" for i in range(len(n_per_class))]
    report = ValidationReport(
        len(classes), dict(zip(classes, n_per_class, strict=True)), num_train=len(labels)
    )
    return LoadedDataset(classes, ImageSet(images, labels), None, None, report)


def test_split_is_stratified_deterministic_and_disjoint() -> None:
    ds = _synthetic([50, 30, 10, 2])
    a = split_train_val(ds, 0.2, seed=3)
    b = split_train_val(ds, 0.2, seed=3)
    c = split_train_val(ds, 0.2, seed=4)
    assert a.val is not None and b.val is not None and c.val is not None
    assert np.array_equal(a.val.images, b.val.images) and np.array_equal(a.train.images, b.train.images)
    assert not np.array_equal(a.val.images, c.val.images)
    assert np.bincount(a.val.labels, minlength=4).tolist() == [10, 6, 2, 0]
    assert np.bincount(a.train.labels, minlength=4).tolist() == [40, 24, 8, 2]
    assert isinstance(a.train.images, np.ndarray) and isinstance(a.val.images, np.ndarray)
    ids = np.concatenate([a.train.images[:, 0, 0, 0], a.val.images[:, 0, 0, 0]])
    assert sorted(ids.tolist()) == list(range(92))  # a partition: nothing lost, nothing duplicated
    assert (a.report.num_train, a.report.num_val) == (74, 18)
    assert ds.report.num_val == 0  # the input is not mutated


def test_split_keeps_an_existing_val_and_one_train_image() -> None:
    ds = _synthetic([1, 4])
    s = split_train_val(ds, 0.5, seed=0)
    assert s.val is not None and np.bincount(s.train.labels).tolist() == [1, 2]
    assert split_train_val(s, 0.5, seed=1) is s
    with pytest.raises(DatasetError):
        split_train_val(ds, 1.5, seed=0)


def test_preprocess_normalises_exactly() -> None:
    img = np.full((2, 4, 4, 3), 255, dtype=np.uint8)
    img[1] = 0
    x = preprocess(img, (4, 4), MEAN, STD)
    assert x.dtype == torch.float32 and x.shape == (2, 3, 4, 4)
    for ch in range(3):
        assert torch.allclose(x[0, ch], torch.tensor((1 - MEAN[ch]) / STD[ch]))
        assert torch.allclose(x[1, ch], torch.tensor(-MEAN[ch] / STD[ch]))


def test_preprocess_resizes_with_antialias() -> None:
    checker = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)[None, ..., None]  # 1-px checkerboard
    x = preprocess(checker, 16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert x.shape == (1, 3, 16, 16)
    # antialiased downscale averages the checkerboard to mid-grey; plain bilinear would alias
    assert torch.allclose(x, torch.full_like(x, 0.5), atol=0.02)
    up = preprocess(np.full((1, 2, 2, 3), 100, dtype=np.uint8), (7, 9), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert up.shape == (1, 3, 7, 9) and torch.allclose(up, torch.full_like(up, 100 / 255))


# --- dataset URIs -------------------------------------------------------------------------------


def test_file_uri_inside_roots(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    target = root / "sub" / "d.npz"
    target.write_bytes(b"x")
    got = resolve_dataset_uri(
        target.as_uri(), roots=[root], allow_http=False, max_bytes=10, cache_dir=tmp_path
    )
    assert got == target.resolve()


@pytest.mark.parametrize("where", ["outside", "dotdot", "symlink"])
def test_file_uri_outside_roots_is_refused(tmp_path: Path, where: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    secret = tmp_path / "secret.npz"
    secret.write_bytes(b"x")
    (root / "link.npz").symlink_to(secret)
    uri = {
        "outside": secret.as_uri(),
        "dotdot": f"file://{root}/../secret.npz",
        "symlink": (root / "link.npz").as_uri(),
    }[where]
    with pytest.raises(DatasetError) as info:
        resolve_dataset_uri(uri, roots=[root], allow_http=False, max_bytes=10, cache_dir=tmp_path)
    assert info.value.code == "invalid_dataset_uri" and info.value.param == "dataset_uri"


@pytest.mark.parametrize(
    "uri", ["ftp://example.com/d.zip", "/plain/path", "gopher://x/y", "file://evil.host/x"]
)
def test_other_schemes_are_refused(tmp_path: Path, uri: str) -> None:
    with pytest.raises(DatasetError) as info:
        resolve_dataset_uri(uri, roots=[tmp_path], allow_http=True, max_bytes=10, cache_dir=tmp_path)
    assert info.value.code == "invalid_dataset_uri"


def test_s3_without_fsspec_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fsspec", None)  # import fsspec -> ImportError
    with pytest.raises(DatasetError, match="fsspec") as info:
        resolve_dataset_uri("s3://bucket/d.zip", roots=[], allow_http=True, max_bytes=10, cache_dir=tmp_path)
    assert info.value.code == "invalid_dataset_uri"


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[str]:
    """A real HTTP server on loopback serving tmp_path/www."""
    www = tmp_path / "www"
    www.mkdir()
    (www / "small.npz").write_bytes(b"0123456789" * 10)
    (www / "big.zip").write_bytes(b"z" * 5000)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(www), **kwargs)  # type: ignore[arg-type]

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            if self.path.startswith("/hop/"):  # /hop/N redirects N times, then to /small.npz
                n = int(self.path.rsplit("/", 1)[1])
                self.send_response(302)
                self.send_header("Location", f"/hop/{n - 1}" if n > 1 else "/small.npz")
                self.end_headers()
            elif self.path == "/to-file":
                self.send_response(302)
                self.send_header("Location", "file:///etc/passwd")
                self.end_headers()
            else:
                super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_download(http_server: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    kw = {"roots": [], "max_bytes": 1000, "cache_dir": cache}
    with pytest.raises(DatasetError, match="disabled") as info:
        resolve_dataset_uri(f"{http_server}/small.npz", allow_http=False, **kw)  # type: ignore[arg-type]
    assert info.value.code == "invalid_dataset_uri"
    with pytest.raises(DatasetError, match="non-public") as info:
        resolve_dataset_uri(f"{http_server}/small.npz", allow_http=True, **kw)  # type: ignore[arg-type]
    assert info.value.code == "invalid_dataset_uri"
    got = resolve_dataset_uri(f"{http_server}/small.npz", allow_http=True, allow_private=True, **kw)  # type: ignore[arg-type]
    assert got.parent == cache and got.suffix == ".npz" and got.read_bytes() == b"0123456789" * 10
    with pytest.raises(DatasetError, match="limit"):
        resolve_dataset_uri(f"{http_server}/big.zip", allow_http=True, allow_private=True, **kw)  # type: ignore[arg-type]
    assert not any(p.name.endswith(".zip") for p in cache.iterdir())  # no partial file left behind
    with pytest.raises(DatasetError, match="404"):
        resolve_dataset_uri(f"{http_server}/nope.zip", allow_http=True, allow_private=True, **kw)  # type: ignore[arg-type]


def test_http_redirects_are_followed_within_the_limit(http_server: str, tmp_path: Path) -> None:
    kw = {"roots": [], "max_bytes": 1000, "allow_http": True, "allow_private": True}
    got = resolve_dataset_uri(f"{http_server}/hop/3", cache_dir=tmp_path / "a", **kw)  # type: ignore[arg-type]
    assert got.read_bytes() == b"0123456789" * 10
    with pytest.raises(DatasetError, match="more than 5 redirects") as info:
        resolve_dataset_uri(f"{http_server}/hop/6", cache_dir=tmp_path / "b", **kw)  # type: ignore[arg-type]
    assert info.value.code == "invalid_dataset_uri"
    with pytest.raises(DatasetError, match="unsupported URL"):
        resolve_dataset_uri(f"{http_server}/to-file", cache_dir=tmp_path / "c", **kw)  # type: ignore[arg-type]


def test_the_connected_peer_is_checked_even_when_dns_looked_public(
    http_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: the name passed the check, then connected to a private address. The second guard,
    on the connected socket, must still refuse before any request is sent."""
    from service.engine.datasets import remote

    monkeypatch.setattr(remote, "_check_host", lambda host, port, allow_private: None)  # a lying resolver
    kw = {"roots": [], "max_bytes": 1000, "allow_http": True, "cache_dir": tmp_path}
    with pytest.raises(DatasetError, match="non-public") as info:
        resolve_dataset_uri(f"{http_server}/small.npz", **kw)  # type: ignore[arg-type]
    assert info.value.code == "invalid_dataset_uri"
    with pytest.raises(DatasetError, match="non-public"):
        remote.fetch_http_bytes(f"{http_server}/small.npz", max_bytes=1000)
