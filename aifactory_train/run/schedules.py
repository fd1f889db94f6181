"""Learning-rate schedules shared by the recipes."""

from __future__ import annotations

import math


def warmup_cosine(optimizer, total_steps, warmup_steps: int, min_lr_ratio: float):
    """Linear warmup to the base LR, then cosine decay to ``min_lr_ratio`` x base LR, stepped per batch.

    A LambdaLR rather than SequentialLR(LinearLR, CosineAnnealingLR): one scheduler whose state is a step
    count resumes exactly (SequentialLR's milestones have known resume quirks); transformers has the same
    curve but is too heavy a dependency for the vision recipes.

    ``total_steps`` may be a callable, asked at the first step this process takes. The recipes pass
    ``lambda: planned_optimizer_steps(self.trainer)``. Asking for a length inside configure_optimizers makes
    Lightning build the train DataLoader before a checkpoint's loop state is restored, and it then never restores
    the DataLoader's position (a run resumed mid-epoch would replay the epoch from its first batch).
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


def planned_optimizer_steps(trainer) -> int:
    """How many optimizer steps the fit will have taken when it ends: those already taken plus those its loop
    has left. Ask it from a training step (where a scheduler asks for its length) or from ``on_train_start``.

    Why not Lightning's ``trainer.estimated_stepping_batches``: that is ``max_epochs`` times the steps of one
    epoch *on the current ranks*. After a resume on another number of ranks (``ResumableSampler``) the steps
    already taken were of another size, so the estimate is wrong by the difference: 2 ranks -> 1 stopped a cosine
    well before its end, 1 -> 2 reached its end early and stayed there. Counted from where the loop stands, the schedule ends
    with the run, on any rank count, after any number of resumes.
    """
    batches = trainer.num_training_batches  # per rank and epoch, after limit_train_batches
    if trainer.max_epochs is None or trainer.max_epochs < 0 or not math.isfinite(batches):
        return int(trainer.estimated_stepping_batches)  # a length set by max_steps only: nothing to count
    batches, accumulate = int(batches), trainer.accumulate_grad_batches
    per_epoch = math.ceil(batches / accumulate)  # the epoch's last batch steps with what it has accumulated
    loop = trainer.fit_loop
    epochs_after_this = max(0, trainer.max_epochs - trainer.current_epoch - 1)
    if loop.epoch_progress.current.started > loop.epoch_progress.current.completed:  # inside an epoch
        done = loop.epoch_loop.batch_progress.current.ready  # its batches taken so far
        taken = math.ceil(done / accumulate) if done >= batches else done // accumulate
        left = per_epoch - taken + per_epoch * epochs_after_this
    else:  # between epochs (resumed from an epoch's end, or the fit is over): the current one has not begun
        left = per_epoch * max(0, trainer.max_epochs - trainer.current_epoch)
    planned = trainer.global_step + left
    return min(planned, trainer.max_steps) if trainer.max_steps >= 0 else planned
