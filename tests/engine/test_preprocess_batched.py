"""Preprocessing a predict request's images as one batch gives what image-by-image preprocessing gives."""

from __future__ import annotations

import numpy as np
import torch

from service.engine import preprocess


def test_same_size_list_is_batched_and_equal_to_one_by_one() -> None:
    rng = np.random.default_rng(0)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    same = [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(5)]
    mixed = [*same[:2], rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)]
    for images in (same, mixed):
        together = preprocess(images, 32, mean, std)  # [N, 3, 32, 32]
        alone = torch.cat([preprocess([im], 32, mean, std) for im in images])
        assert together.shape == (len(images), 3, 32, 32)
        torch.testing.assert_close(together, alone, atol=1e-6, rtol=0)
        assert not torch.equal(together[0], together[1])  # rows stay in order, not broadcast
