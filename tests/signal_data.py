"""Images whose class survives only through a prompt: a linear probe on pooled features cannot learn them.

Each image is noise plus one bright square; the class is *where* the square sits (upper or lower half), at a
random column and a random row within that half. Convolutions are translation-equivariant and global
pooling averages positions away, so the pooled features of both classes are alike (a linear head stays near
chance). A prompt added to a spatial activation is position-dependent: after the next non-linearity the two
positions pool differently, so activation prompting separates them. A product that never adds the prompt
scores like the linear probe, and the tests that use these images fail.
"""

from __future__ import annotations

import numpy as np

CLASSES = ["upper", "lower"]
SIZE = 32
SQUARE = 6


def square_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` uint8 [n, 32, 32, 3] images (classes alternate) and their int64 labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % 2
    images = rng.integers(40, 90, size=(n, SIZE, SIZE, 3)).astype(np.int64)
    for i, label in enumerate(labels):
        row = int(rng.integers(3, 9)) + (16 if label else 0)
        col = int(rng.integers(3, SIZE - SQUARE - 3))
        images[i, row : row + SQUARE, col : col + SQUARE, :] += 150
    return np.clip(images, 0, 255).astype(np.uint8), labels
