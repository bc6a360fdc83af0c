"""Accuracy of AP against the baselines users would pick, on real weights and data.

Protocol per (backbone, dataset) "scope" (the test split never chooses anything):
1. Learning rate per method on the validation split (carved, stratified, from the training images), at
   seed 0 and the scope's full budget, on a log grid that is extended while the best value sits at an
   edge. The chosen run *is* the seed-0 headline run; further seeds rerun it.
2. AP: the learning rate is tuned at the recommended layer, then a layer sweep at that rate; the layer
   with the best *validation* accuracy is the AP layer (full and channel shape; channel gets its own
   learning-rate grid at that layer).
3. Every run goes through ``service.engine.pipeline.train_prompt``, the function training jobs call.

Runs execute in ``--jobs`` worker processes (one torch thread each); every finished run is cached
under ``<out>/.rows/<commit>/`` so a cut run resumes at the same commit (and never reuses rows of other
code). ``python -m bench.accuracy [--quick | --budget full] [--only resnet20_cifar/gtsrb,...]``

The package: `plans` (what to run), `protocol` (which runs are needed), `runs` (one run), `driver`
(execute and collect), `plots`.
"""

from bench.accuracy.driver import collect, execute, main, run
from bench.accuracy.plans import (
    ALL_VARIANTS,
    BACKBONES,
    PLANS,
    SERVABLE,
    VARIANT_LABELS,
    VARIANTS,
    Plan,
    Scope,
)
from bench.accuracy.protocol import Protocol

__all__ = [
    "ALL_VARIANTS",
    "BACKBONES",
    "PLANS",
    "SERVABLE",
    "VARIANTS",
    "VARIANT_LABELS",
    "Plan",
    "Protocol",
    "Scope",
    "collect",
    "execute",
    "main",
    "run",
]
