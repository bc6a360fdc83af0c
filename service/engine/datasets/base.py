"""The dataset types every loader returns, image decoding, and the shared validation step.

Loaders (class folders, archives, manifests, ``.npz``) only gather ``(split, label, image)`` samples;
``build_dataset`` turns them into a :class:`LoadedDataset` with one validation report, so every format
is checked by the same rules.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.engine.errors import DatasetError, ImageDecodeError

#: Split names as they appear in folder layouts and manifests, mapped to our three splits.
SPLIT_ALIASES: dict[str, str] = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}
SPLITS = ("train", "val", "test")
#: File suffixes treated as images in folders and archives; other files are ignored (and counted).
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"}
)
#: Pillow's own bomb guard only warns below 2x its limit; we refuse anything above this many pixels.
MAX_IMAGE_PIXELS = 40_000_000
#: The report keeps this many undecodable names (the count is exact).
MAX_LISTED_UNDECODABLE = 20


@dataclass
class ImageSet:
    """Decoded images with their labels, not yet preprocessed (so any backbone size can use them)."""

    images: np.ndarray | list[np.ndarray]  # uint8 [N, H, W, C] (C = 1 or 3) when all share a size
    labels: np.ndarray  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageSet:
        """The rows at ``indices``, in that order."""
        idx = np.asarray(indices, dtype=np.int64)
        if isinstance(self.images, np.ndarray):
            return ImageSet(self.images[idx], self.labels[idx])
        return ImageSet([self.images[int(i)] for i in idx], self.labels[idx])


@dataclass
class ValidationReport:
    """What validation found; stored on the job so a user sees why a dataset was accepted or not."""

    num_classes: int
    images_per_class: dict[str, int]  # training images per class (before any train/val split)
    undecodable: list[str] = field(default_factory=list)  # the first MAX_LISTED_UNDECODABLE names
    num_undecodable: int = 0
    classes_below_minimum: list[str] = field(default_factory=list)
    num_train: int = 0
    num_val: int = 0
    num_test: int = 0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (the job row stores it as JSON)."""
        return asdict(self)


@dataclass
class LoadedDataset:
    """A validated dataset: class names in label order, the splits, and the report."""

    classes: list[str]
    train: ImageSet
    val: ImageSet | None
    test: ImageSet | None
    report: ValidationReport


#: Pillow modes `Image.convert("RGB")` maps correctly (8 bits per channel, or 1-bit), alpha dropped.
_RGB_CONVERTIBLE = frozenset(
    {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"}
)
#: Single-channel modes with more than 8 bits: `convert` would clip them (a 16-bit PNG turns white).
_WIDE_GRAY = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})


def _wide_gray_to_rgb(img: Image.Image) -> np.ndarray:
    """16-bit, 32-bit integer and float grayscale scaled to 8 bits, then replicated to RGB.

    16-bit images use their full range (0..65535 -> 0..255). A 32-bit integer image whose values fit 16 bits
    is read as 16-bit (Pillow opens some 16-bit files as mode "I"); a float image in [0, 1] as a fraction;
    anything else is scaled from its own min..max (the only mapping that keeps the picture visible).
    """
    values = np.asarray(img, dtype=np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if img.mode == "F" and low >= 0.0 and high <= 1.0:
        scaled = values * 255.0
    elif img.mode.startswith("I;16") or (img.mode == "I" and low >= 0 and high <= 65535):
        scaled = values / 257.0
    elif high > low:
        scaled = (values - low) * (255.0 / (high - low))
    else:
        scaled = np.zeros_like(values)
    gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in _WIDE_GRAY:
        return _wide_gray_to_rgb(img)
    if img.mode not in _RGB_CONVERTIBLE:
        raise ImageDecodeError(
            f"unsupported image mode {img.mode!r}: send 8-bit (L, RGB, RGBA, P, CMYK) or 16-bit grayscale"
        )
    if img.mode in ("P", "PA") or "transparency" in img.info:
        img = img.convert("RGBA")  # so transparent pixels do not turn into palette garbage
    return np.array(img.convert("RGB"), dtype=np.uint8)  # a writable copy


def decode_image(data: bytes) -> np.ndarray:
    """Decode image bytes with Pillow into uint8 HWC RGB (EXIF orientation applied, first frame).

    Every Pillow mode either converts faithfully (16/32-bit and float grayscale are scaled to 8 bits, not
    clipped) or is refused with its name.

    Raises:
        ImageDecodeError: the bytes are not an image Pillow can read, use an unsupported mode, or are
            absurdly large.
    """
    if not data:
        raise ImageDecodeError("the image is empty (0 bytes)")
    try:
        # No warnings.catch_warnings() around this: it cost about 5 % of a one-image predict in the front,
        # and the size check below refuses every image Pillow would warn about (its bomb threshold is
        # above MAX_IMAGE_PIXELS) from the header, before a pixel is decoded.
        with Image.open(io.BytesIO(data)) as opened:
            width, height = opened.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ImageDecodeError(f"image of {width}x{height} pixels exceeds {MAX_IMAGE_PIXELS}")
            opened.seek(0)
            opened.load()
            img: Image.Image = ImageOps.exif_transpose(opened)
            arr = _to_rgb(img)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:  # its message names a BytesIO object, which helps nobody
        raise ImageDecodeError(f"not an image in a known format ({len(data)} bytes)") from None
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ValueError, bomb errors)
        raise ImageDecodeError(f"cannot decode image: {exc}") from exc
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageDecodeError(f"decoded image has an unusable shape {arr.shape}")
    return arr


def sort_class_names(names: Iterable[str]) -> list[str]:
    """Sort class names; numerically when every name is an integer (so "10" comes after "9")."""
    unique = set(names)
    if unique and all(n.lstrip("-").isdigit() for n in unique):
        return sorted(unique, key=int)
    return sorted(unique)


def stack_images(images: list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    """One uint8 [N, H, W, C] array when all images share a shape, else the list as is."""
    if images and all(im.shape == images[0].shape for im in images):
        return np.stack(images).astype(np.uint8, copy=False)
    if not images:
        return np.zeros((0, 1, 1, 3), dtype=np.uint8)
    return images


@dataclass
class Sample:
    """One decoded image on its way into a dataset."""

    split: str  # "train" | "val" | "test"
    label: str
    image: np.ndarray  # uint8 HWC
    name: str = ""  # where it came from (sort key, so every source yields a stable order)


@dataclass
class Collected:
    """What a loader gathered: decoded samples plus what it had to skip."""

    samples: list[Sample] = field(default_factory=list)
    undecodable: list[str] = field(default_factory=list)
    num_undecodable: int = 0
    warnings: list[str] = field(default_factory=list)

    def add_undecodable(self, name: str) -> None:
        self.num_undecodable += 1
        if len(self.undecodable) < MAX_LISTED_UNDECODABLE:
            self.undecodable.append(name)

    def add_bytes(self, split: str, label: str, name: str, data: bytes) -> None:
        """Decode ``data``; an image that does not decode is listed, not fatal."""
        try:
            self.samples.append(Sample(split, label, decode_image(data), name))
        except ImageDecodeError:
            self.add_undecodable(name)


def below_minimum_message(below: list[str], counts: dict[str, int], minimum: int) -> str:
    shown = ", ".join(f"{name!r} ({counts.get(name, 0)})" for name in below[:10])
    more = f" and {len(below) - 10} more" if len(below) > 10 else ""
    return (
        f"{len(below)} class(es) have fewer than {minimum} training images: {shown}{more}; "
        "add images or remove those classes"
    )


def dataset_refused(
    message: str,
    images_per_class: dict[str, int],
    below: list[str],
    *,
    undecodable: Sequence[str] = (),
    num_undecodable: int = 0,
    warnings: Sequence[str] = (),
) -> DatasetError:
    """The error with what validation found attached (the job stores it as its validation_report)."""
    partial = ValidationReport(
        num_classes=len(images_per_class),
        images_per_class=dict(images_per_class),
        undecodable=list(undecodable),
        num_undecodable=num_undecodable,
        classes_below_minimum=list(below),
        num_train=sum(images_per_class.values()),
        warnings=[*warnings, message],
    )
    return DatasetError(message, details=partial.to_dict())


def build_dataset(
    collected: Collected,
    *,
    min_images_per_class: int,
    classes: Sequence[str] | None = None,
) -> LoadedDataset:
    """Validate the gathered samples and assemble a :class:`LoadedDataset`.

    Classes come from the training split (or ``classes`` when the format names them, e.g. ``.npz``).
    Samples in val/test whose class never occurs in training are dropped with a warning: nothing could
    be learned for them.

    Raises:
        DatasetError: no decodable training images, fewer than two classes, or classes below the minimum.
    """
    warns = list(collected.warnings)
    train_labels = [s.label for s in collected.samples if s.split == "train"]
    names = list(classes) if classes is not None else sort_class_names(train_labels)
    counts = Counter(train_labels)
    images_per_class = {name: int(counts.get(name, 0)) for name in names}
    below = [name for name in names if images_per_class[name] < min_images_per_class]

    def failed(message: str) -> DatasetError:
        return dataset_refused(
            message,
            images_per_class,
            below,
            undecodable=collected.undecodable,
            num_undecodable=collected.num_undecodable,
            warnings=warns,
        )

    if not train_labels:
        detail = f" ({collected.num_undecodable} file(s) did not decode)" if collected.num_undecodable else ""
        raise failed(f"the dataset has no decodable training images{detail}")
    if len(names) < 2:
        raise failed(f"a classification dataset needs at least 2 classes, found {len(names)}")
    index = {name: i for i, name in enumerate(names)}
    if below:
        raise failed(below_minimum_message(below, images_per_class, min_images_per_class))

    splits: dict[str, ImageSet | None] = {}
    for split in SPLITS:
        rows = [s for s in collected.samples if s.split == split]
        unknown = Counter(s.label for s in rows if s.label not in index)
        if unknown:
            warns.append(
                f"{split}: dropped {sum(unknown.values())} image(s) of class(es) absent from training: "
                + ", ".join(sorted(unknown)[:10])
            )
            rows = [s for s in rows if s.label in index]
        if split != "train" and not rows:
            splits[split] = None
            continue
        splits[split] = ImageSet(
            stack_images([s.image for s in rows]),
            np.asarray([index[s.label] for s in rows], dtype=np.int64),
        )
    if collected.num_undecodable:
        warns.append(f"{collected.num_undecodable} file(s) did not decode and were skipped")
    train = splits["train"]
    assert train is not None
    report = ValidationReport(
        num_classes=len(names),
        images_per_class=images_per_class,
        undecodable=list(collected.undecodable),
        num_undecodable=collected.num_undecodable,
        classes_below_minimum=below,
        num_train=len(train),
        num_val=len(splits["val"] or ()),
        num_test=len(splits["test"] or ()),
        warnings=warns,
    )
    return LoadedDataset(names, train, splits["val"], splits["test"], report)
