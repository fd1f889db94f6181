"""Learning-rate schedules shared by the recipes."""

from __future__ import annotations

import math


def warmup_cosine(optimizer, total_steps, warmup_steps: int, min_lr_ratio: float):
    """Linear warmup to the base LR, then cosine decay to ``min_lr_ratio`` x base LR, stepped per batch.

    A LambdaLR rather than SequentialLR(LinearLR, CosineAnnealingLR): one scheduler whose state is a step
    count resumes exactly (SequentialLR's milestones have known resume quirks); transformers has the same
    curve but is too heavy a dependency for the vision recipes.

    ``total_steps`` may be a callable, asked only when the decay begins. The recipes pass
    ``lambda: trainer.estimated_stepping_batches``: asking for it inside configure_optimizers makes Lightning
    build the train DataLoader before a checkpoint's loop state is restored, and it then never restores the
    DataLoader's position (a run resumed mid-epoch would replay the epoch from its first batch).
    """
    import torch

    known: dict[str, int] = {}

    def total() -> int:
        if "total" not in known:
            known["total"] = max(1, int(total_steps() if callable(total_steps) else total_steps))
        return known["total"]

    def factor(step: int) -> float:
        if step == 0 and "total" not in known:  # LambdaLR's call at construction: no total needed yet
            return 1.0 / warmup_steps if warmup_steps > 0 else 1.0
        warmup = min(warmup_steps, max(0, total() - 1))
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total() - warmup)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
