"""Serving cost of LoRA in the mixed pass: 64 rows over 32 distinct adapters in one forward pass.

Per backbone, against: one adapter (unmerged: peft's own forward of the trained module, and the bank
with every row on one slot), the bare backbone, PEFT's `adapter_names` mixed batch (a PeftModel holding
the same 32 adapters), and merged weights (W + s B A folded into a copy: one adapter at the bare cost).
Both per-row convolution mechanisms of `service.engine.lora_rows` are timed, so the default is chosen
on numbers. Adapters are synthetic (random factors and heads, rank 4): cost depends on shapes only.
Timed in CPU seconds of this process (torch on one thread), best of interleaved repetitions.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bench.common import log
from bench.synthetic import random_lora_artifacts
from service.engine import Backbone
from service.engine.artifacts import PromptArtifact, load_module
from service.engine.lora_rows import CONV_MODES
from service.engine.methods import LoRAConfig
from service.engine.methods.lora import lora_factors
from service.engine.mixed_batch import PromptBank, forward_mixed

#: mixed (32 adapters) / one adapter unmerged, and mixed / PEFT's adapter_names mixed batch.
LORA_GOALS = {"mixed_vs_one_adapter": 0.85, "mixed_vs_peft_mixed": 3.0}
LORA_CASES = [
    "bare",
    "merged",
    "one_adapter_peft",
    "one_adapter_bank",
    "mixed",
    "mixed_stacked",
    "peft_mixed",
]


def _merged_model(bb: Backbone, art: PromptArtifact) -> nn.Module:
    """A copy of the backbone's model with one adapter folded into its weights: W <- W + s B A."""
    import copy

    cfg = art.method_config
    assert isinstance(cfg, LoRAConfig)
    model = copy.deepcopy(bb.model)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, (a, b) in lora_factors(bb, cfg, art.tensors).items():
            w = modules[name].weight  # [C_out, C_in, kh, kw] / [D_out, D_in]
            update = b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)  # [C_out, C_in * kh * kw]
            w.add_(cfg.scale * update.view_as(w))
    return model


def _peft_mixed_model(bb: Backbone, arts: list[PromptArtifact]) -> nn.Module:
    """A PeftModel holding every adapter (named a0..aN), for PEFT's own `adapter_names` mixed batch."""
    import copy

    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    cfg = arts[0].method_config
    assert isinstance(cfg, LoRAConfig)
    targets = arts[0].metadata["lora_targets"]
    pattern = "|".join(targets).replace(".", r"\.")
    peft_cfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, target_modules=pattern)
    model = get_peft_model(copy.deepcopy(bb.model), peft_cfg, adapter_name="a0")
    for i in range(1, len(arts)):
        model.add_adapter(f"a{i}", peft_cfg)
    layers = {
        n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, LoraLayer)
    }
    with torch.no_grad():
        for i, art in enumerate(arts):
            for name, (a, b) in lora_factors(bb, cfg, art.tensors).items():
                layers[name].lora_A[f"a{i}"].weight.copy_(a)
                layers[name].lora_B[f"a{i}"].weight.copy_(b)
    return model.eval()


def bench_lora(bb: Backbone, *, batch: int, adapters: int, reps: int, rank: int = 4) -> dict[str, Any]:
    """Rows per CPU-second of every case (see the module docstring) and the ratios the goals name."""
    log(f"lora {bb.spec.model}: {batch} rows over {adapters} adapters (rank {rank}), {reps} reps")
    arts = random_lora_artifacts(bb, adapters, rank=rank, num_classes=10, seed=0)
    bank = PromptBank(bb, adapters, max_classes=10)
    for slot, art in enumerate(arts):
        bank.write(slot, art)
    x = torch.randn(batch, 3, *bb.input_size, generator=torch.Generator().manual_seed(0))  # [B, 3, H, W]
    mixed = torch.tensor([i % adapters for i in range(batch)])  # [B] two rows per adapter at 64 / 32
    mixed = mixed[torch.randperm(batch, generator=torch.Generator().manual_seed(1))]
    one = torch.zeros(batch, dtype=torch.long)  # [B] every row on slot 0
    head = nn.Linear(bb.num_features, 10)
    single = load_module(arts[0], bb)  # peft's forward of one trained adapter, unmerged
    merged = _merged_model(bb, arts[0])
    peft_mixed = _peft_mixed_model(bb, arts)
    names = [f"a{int(s)}" for s in mixed]

    def with_mode(mode: str, slots: torch.Tensor) -> Callable[[], object]:
        def run() -> object:
            bank.lora.conv_mode = mode  # type: ignore[assignment]
            try:
                return forward_mixed(bb, bank, x, slots)
            finally:
                bank.lora.conv_mode = "grouped"

        return run

    cases: dict[str, Callable[[], object]] = {
        "bare": lambda: head(bb.forward_features(x)),
        "merged": lambda: merged(x),
        "one_adapter_peft": lambda: single(x),
        "one_adapter_bank": lambda: forward_mixed(bb, bank, x, one),
        "mixed": lambda: forward_mixed(bb, bank, x, mixed),
        "mixed_stacked": with_mode("stacked", mixed),
        "peft_mixed": lambda: peft_mixed(x, adapter_names=names),
    }
    assert set(cases) == set(LORA_CASES) and "stacked" in CONV_MODES
    cpu: dict[str, list[float]] = {k: [] for k in cases}
    with torch.inference_mode():
        for fn in cases.values():  # warm-up (allocator, oneDNN primitives)
            fn()
        order = list(cases)
        for _ in range(reps):  # interleaved, in a fresh order each time
            random.Random(len(cpu["bare"])).shuffle(order)
            for name in order:
                c0 = time.process_time()
                cases[name]()
                cpu[name].append(time.process_time() - c0)
    best = {k: min(v) for k, v in cpu.items()}
    thr = {k: batch / v for k, v in best.items()}

    def ratio(a: str, b: str) -> float:
        return round(thr[a] / thr[b], 4)

    out = {
        "batch": batch,
        "adapters": adapters,
        "rank": rank,
        "reps": reps,
        "throughput_rows_per_s": {k: round(v, 2) for k, v in thr.items()},
        "best_cpu_ms": {k: round(1000 * v, 3) for k, v in best.items()},
        "median_cpu_ms": {k: round(1000 * statistics.median(v), 3) for k, v in cpu.items()},
        "mixed_vs_one_adapter": ratio("mixed", "one_adapter_peft"),
        "mixed_vs_one_adapter_bank": ratio("mixed", "one_adapter_bank"),
        "mixed_vs_peft_mixed": ratio("mixed", "peft_mixed"),
        "mixed_vs_bare": ratio("mixed", "bare"),
        "mixed_vs_merged": ratio("mixed", "merged"),
        "grouped_vs_stacked": ratio("mixed", "mixed_stacked"),
    }
    log(
        f"lora {bb.spec.model}: "
        + ", ".join(f"{k} {v:.1f}" for k, v in thr.items())
        + f" rows/s | mixed/one {out['mixed_vs_one_adapter']:.3f}"
        + f" mixed/peft-mixed {out['mixed_vs_peft_mixed']:.2f}"
    )
    return out
