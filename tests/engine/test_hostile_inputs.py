"""Hostile inputs: every Pillow mode decoded
faithfully or refused by name, archive members streamed under per-member / total / ratio limits, and
errors that say what is wrong with which file."""

from __future__ import annotations

import io
import tarfile
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.engine import decode_image
from service.engine.data import load_dataset
from service.engine.errors import DatasetError, ImageDecodeError


def _encode(img: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


# --- 5. every mode ----------------------------------------------------------------------------------
def _gradient16() -> np.ndarray:
    return np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)  # [16, 16]


@pytest.mark.parametrize(
    ("name", "data", "expected_gray"),
    [
        # 16-bit PNG (mode I;16): full range scaled to 8 bits, not clipped to white.
        ("png16", _encode(Image.fromarray(_gradient16())), np.rint(_gradient16() / 257.0)),
        # 32-bit integer TIFF holding 16-bit values (how Pillow opens several 16-bit files).
        (
            "tiff-I",
            _encode(Image.fromarray(_gradient16().astype(np.int32)), "TIFF"),
            np.rint(_gradient16() / 257.0),
        ),
        # float TIFF in [0, 1].
        (
            "tiff-F",
            _encode(Image.fromarray((_gradient16() / 65535.0).astype(np.float32)), "TIFF"),
            np.rint(_gradient16() / 65535.0 * 255.0),
        ),
    ],
    ids=["png16", "tiff-I", "tiff-F"],
)
def test_wide_grayscale_is_scaled_to_8_bits(name: str, data: bytes, expected_gray: np.ndarray) -> None:
    out = decode_image(data)
    assert out.dtype == np.uint8 and out.shape == (16, 16, 3)
    assert np.abs(out[..., 0].astype(int) - expected_gray.astype(int)).max() <= 1, name
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert out.min() == 0 and out.max() == 255  # the whole range survives (main: all white)


def test_eight_bit_modes_keep_their_colours() -> None:
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    base = Image.fromarray(rgb)
    cases = {
        "RGBA": _encode(base.convert("RGBA")),
        "P": _encode(base.convert("P", palette=Image.Palette.ADAPTIVE)),
        "CMYK": _encode(base.convert("CMYK"), "TIFF"),
        "LA": _encode(Image.fromarray(np.full((8, 8), 77, np.uint8)).convert("LA")),
        "L": _encode(Image.fromarray(np.full((8, 8), 77, np.uint8))),
        "1": _encode(Image.fromarray(np.full((8, 8), 255, np.uint8)).convert("1")),
    }
    expected = {"LA": (77, 77, 77), "L": (77, 77, 77), "1": (255, 255, 255)}
    for mode, data in cases.items():
        assert Image.open(io.BytesIO(data)).mode == mode
        out = decode_image(data)
        want = np.array(expected.get(mode, (200, 100, 50)))
        assert np.abs(out.reshape(-1, 3).astype(int) - want).max() <= 2, (mode, out[0, 0])


def test_exif_orientation_is_applied() -> None:
    arr = np.zeros((4, 8, 3), dtype=np.uint8)  # wide: 4 rows, 8 columns, left half white
    arr[:, :4] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = decode_image(_encode(Image.fromarray(arr), "JPEG", exif=exif, quality=95))
    assert out.shape == (8, 4, 3)  # displayed upright: tall
    assert out[:4].mean() > 200 and out[4:].mean() < 50  # the white half is now on top


def test_an_unsupported_mode_is_refused_by_name() -> None:
    lab = _encode(Image.new("LAB", (4, 4)), "TIFF")
    with pytest.raises(ImageDecodeError, match="'LAB'"):
        decode_image(lab)


def test_training_images_in_16_bit_are_decoded_right(tmp_path: Path) -> None:
    """The dataset path uses the same decoder: 16-bit class-folder images keep their values."""
    for label, value in (("dark", 8000), ("bright", 56000)):
        (tmp_path / "ds" / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8), value + i, np.uint16)).save(tmp_path / "ds" / label / f"{i}.png")
    ds = load_dataset(tmp_path / "ds")
    names = ds.classes
    means = {names[c]: float(ds.train.images[ds.train.labels == c].mean()) for c in range(len(names))}
    assert abs(means["dark"] - 8001 / 257) < 1 and abs(means["bright"] - 56001 / 257) < 1, means


# --- 8. clear errors ---------------------------------------------------------------------------------
def test_empty_and_garbage_images_say_so_without_object_reprs() -> None:
    for data, words in ((b"", "empty (0 bytes)"), (b"not an image at all", "not an image")):
        with pytest.raises(ImageDecodeError) as info:
            decode_image(data)
        assert words in str(info.value) and "BytesIO" not in str(info.value) and "0x" not in str(info.value)


def test_empty_training_image_is_listed_by_name(tmp_path: Path) -> None:
    for label in ("a", "b"):
        (tmp_path / "ds" / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / "ds" / label / f"{i}.png")
    (tmp_path / "ds" / "a" / "empty.png").write_bytes(b"")
    ds = load_dataset(tmp_path / "ds")
    assert "a/empty.png" in ds.report.undecodable


@pytest.mark.parametrize(
    "content",
    [b"", b"garbage that is no zip", b"PK\x03\x04 truncated zip header", b"\x80\x04\x95 pickle-ish"],
)
def test_corrupt_npz_is_called_not_a_valid_npz(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.npz"
    path.write_bytes(content)
    with pytest.raises(DatasetError) as info:
        load_dataset(path)
    message = str(info.value)
    assert "broken.npz is not a valid .npz" in message and "allow_pickle" not in message


def test_npz_with_object_arrays_is_refused_as_pickled(tmp_path: Path) -> None:
    path = tmp_path / "objects.npz"
    np.savez(path, x_train=np.array([{"a": 1}], dtype=object), y_train=np.array([0]))
    with pytest.raises(DatasetError, match=r"object \(pickled\) arrays"):
        load_dataset(path)


# --- 6. archives that inflate: bounded while streaming, the member and the limit named --------------
def _zip_of_zeros(path: Path, member: str, size: int) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf, zf.open(member, "w") as fh:
        block = bytes(1 << 20)
        for _ in range(size >> 20):
            fh.write(block)


def test_zip_bomb_member_is_refused_without_inflating_it(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.zip"
    _zip_of_zeros(bomb, "cls/bomb.png", 256 << 20)  # 256 MiB of zeros: a ~250 KB file
    assert bomb.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(DatasetError) as info:
            load_dataset(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert "'cls/bomb.png'" in message and "zip bomb" in message, message
    # Refused after at most max_ratio x its compressed size (~50 MiB), never the whole 256 MiB (main).
    assert peak < 64 << 20, f"{peak} bytes held while refusing the bomb"


def test_member_over_the_per_file_limit_is_named(tmp_path: Path) -> None:
    from service.engine.datasets.folder import DEFAULT_MAX_MEMBER_BYTES

    path = tmp_path / "big.zip"
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf, zf.open("cls/huge.bmp", "w") as fh:
        for _ in range((DEFAULT_MAX_MEMBER_BYTES >> 20) + 2):  # incompressible: the ratio is ~1
            fh.write(rng.bytes(1 << 20))
    with pytest.raises(DatasetError) as info:
        load_dataset(path)
    assert "'cls/huge.bmp'" in str(info.value) and f"{DEFAULT_MAX_MEMBER_BYTES} bytes per file" in str(
        info.value
    )


def test_archive_total_limit_names_the_member_that_crosses_it(tmp_path: Path) -> None:
    path = tmp_path / "many.tar"
    rng = np.random.default_rng(1)
    with tarfile.open(path, "w") as tf:
        for i in range(6):
            data = rng.bytes(1 << 20)
            info = tarfile.TarInfo(f"cls{i % 2}/{i}.png")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with pytest.raises(DatasetError) as info:
        load_dataset(path, max_bytes=3 << 20)
    assert "'cls0/2.png'" in str(info.value) or "'cls1/3.png'" in str(info.value), str(info.value)
    assert f"{3 << 20} bytes in all" in str(info.value)


def test_tar_gz_bomb_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bomb.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        data = bytes(48 << 20)  # under the per-file limit, but ~1000x the archive's size
        info = tarfile.TarInfo("cls/zeros.png")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    with pytest.raises(DatasetError) as info:
        load_dataset(path)
    assert "'cls/zeros.png'" in str(info.value) and "bomb" in str(info.value)


def test_an_ordinary_zip_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "ok.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for label in ("a", "b"):
            for i in range(3):
                zf.writestr(
                    f"data/{label}/{i}.png", _encode(Image.fromarray(np.full((8, 8, 3), 9 * i, np.uint8)))
                )
    ds = load_dataset(path)
    assert ds.classes == ["a", "b"] and len(ds.train) == 6
