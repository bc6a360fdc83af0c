"""The wire between fronts and the engine keeps every tensor it carries; a prediction's top-k is ordered."""

from __future__ import annotations

import pytest
import torch

from service.serving.core import PromptPrediction
from service.serving.transport import decode, encode


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.int64])
def test_every_dtype_crosses_the_wire_unchanged(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(2, 3, 5, 4, generator=gen) * 100).to(dtype)
    empty = torch.empty(0, 7, dtype=dtype)
    strided = x.transpose(1, 3)  # not contiguous: sent as a contiguous copy
    header, (a, b, c) = decode([bytes(f) for f in encode({"op": "reply"}, [x, empty, strided])])
    assert header == {"op": "reply"}
    for sent, got in ((x, a), (empty, b), (strided, c)):
        assert got.dtype == dtype and got.shape == sent.shape
        assert torch.equal(got, sent)


def test_a_tensor_in_a_graph_is_sent_as_its_values() -> None:
    w = torch.randn(4, 3, requires_grad=True)
    _, (got,) = decode([bytes(f) for f in encode({}, [w * 2])])
    assert not got.requires_grad and torch.equal(got, (w * 2).detach())


def test_top_k_is_the_most_probable_first_and_ties_keep_the_lower_index() -> None:
    probs = torch.tensor([[0.1, 0.5, 0.1, 0.3], [0.25, 0.25, 0.25, 0.25]])
    pred = PromptPrediction(key="k", classes=["a", "b", "c", "d"], probabilities=probs)
    first, second = pred.top_k(3)
    assert [(d["label"], d["index"]) for d in first] == [("b", 1), ("d", 3), ("a", 0)]
    assert [d["index"] for d in second] == [0, 1, 2]
    assert first[0]["probability"] == pytest.approx(0.5) and isinstance(first[0]["index"], int)
    assert len(pred.top_k(99)[0]) == 4 and len(pred.top_k(0)[0]) == 1  # clamped to 1..K
