"""``launch/train.py`` with every ``BatchNorm2d`` built as a per-sample normalisation (GroupNorm,
one group), for the world-size equivalence tests (tests/test_world_size.py).

Batch norm normalises with the statistics of the batch it sees, which under DDP is each rank's
slice (by design; ``model.sync_bn`` exists for CUDA only): a 2-process step then differs from a
1-process step by more than rounding, whatever else is right. A per-sample norm keeps the same
network shape and leaves every other part of the step (views, bank, N̂, weights, draws,
schedule, optimizer, EMA, checkpoints) exactly as the trainer runs it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class SampleNorm(nn.GroupNorm):
    """``nn.BatchNorm2d(c, momentum=...)``'s signature, normalising each sample on its own."""

    def __init__(self, num_features: int, *args, **kwargs) -> None:
        super().__init__(1, num_features)


nn.BatchNorm2d = SampleNorm  # before the encoders are built (they look the class up at build time)

from launch.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
