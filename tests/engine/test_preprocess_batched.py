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


def test_images_already_at_the_input_size_normalise_exactly_as_the_formula() -> None:
    """No resize: (x - 255 mean) / (255 std) in float32, bit for bit; gray repeated, alpha dropped."""
    rng = np.random.default_rng(1)
    mean, std = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    for channels in (1, 3, 4):
        images = [rng.integers(0, 256, (32, 32, channels), dtype=np.uint8) for _ in range(3)]
        for batch in (images[:1], images, np.stack(images)):
            got = preprocess(batch, 32, mean, std)
            x = torch.from_numpy(np.stack(list(batch))).permute(0, 3, 1, 2).to(torch.float32)
            x = x.expand(-1, 3, -1, -1) if channels == 1 else x[:, :3]
            assert got.dtype == torch.float32 and got.is_contiguous() and got.shape == (len(batch), 3, 32, 32)
            assert torch.equal(got, (x - m) / s)
