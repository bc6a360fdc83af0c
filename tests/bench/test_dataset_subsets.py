"""The benchmark's class subsets: the first k classes of a packed dataset, all their images, no others."""

from __future__ import annotations

import numpy as np

from bench.common import DATA_DIR, DATASETS, SUBSETS, dataset_path


def test_tinyimagenet20_keeps_the_first_20_classes_whole() -> None:
    source, k = SUBSETS["tinyimagenet20"]
    full = np.load(DATA_DIR / DATASETS[source])
    sub = np.load(dataset_path("tinyimagenet20"))
    assert list(sub["classes"]) == list(full["classes"][:k])
    for split in ("train", "test"):
        keep = full[f"y_{split}"] < k
        assert np.array_equal(sub[f"y_{split}"], full[f"y_{split}"][keep])
        assert np.array_equal(sub[f"x_{split}"], full[f"x_{split}"][keep])
    assert len(sub["y_train"]) == 40 * k and set(np.unique(sub["y_train"])) == set(range(k))
    assert dataset_path("gtsrb") == DATA_DIR / DATASETS["gtsrb"]
