"""Learning-rate schedules shared by the recipes."""

from __future__ import annotations

import math


def warmup_cosine(optimizer, total_steps: int, warmup_steps: int, min_lr_ratio: float):
    """Linear warmup to the base LR, then cosine decay to ``min_lr_ratio`` x base LR, stepped per batch.

    A LambdaLR rather than SequentialLR(LinearLR, CosineAnnealingLR): one scheduler whose state is a step
    count resumes exactly (SequentialLR's milestones have known resume quirks); transformers has the same
    curve but is too heavy a dependency for the vision recipes.
    """
    import torch

    total = max(1, int(total_steps))
    warmup = min(warmup_steps, max(0, total - 1))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
