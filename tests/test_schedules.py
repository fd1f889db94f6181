"""The recipes' learning-rate schedule: its curve, and a length that ends with the run however the run was resumed."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from aifactory_train.run.schedules import planned_optimizer_steps, warmup_cosine


def test_warmup_is_linear_and_the_cosine_ends_at_the_floor_on_the_last_step():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    scheduler = warmup_cosine(optimizer, 12, warmup_steps=4, min_lr_ratio=0.1)
    lrs = []
    for _ in range(12):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([0.125, 0.25, 0.375, 0.5])
    # step s >= 4: 0.5 x (0.1 + 0.9 x (1 + cos(pi (s - 4) / 8)) / 2), decaying over the 8 steps left
    assert lrs[4:] == pytest.approx([0.05 + 0.225 * (1 + math.cos(math.pi * k / 8)) for k in range(8)])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)  # after the last step: the floor


class Recorder(L.Callback):
    """planned_optimizer_steps at the start of fit and after every batch (where a scheduler asks for it)."""

    def __init__(self) -> None:
        self.planned: list[int] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.planned.append(planned_optimizer_steps(trainer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.planned.append(planned_optimizer_steps(trainer))


def fit(folder, *, max_epochs=3, max_steps=-1, accumulate=1, every_n_train_steps=None, ckpt_path=None):
    recorder = Recorder()
    checkpoint = ModelCheckpoint(dirpath=folder, save_last=True, save_top_k=0 if every_n_train_steps else 1,
                                 every_n_train_steps=every_n_train_steps, enable_version_counter=False)
    trainer = L.Trainer(max_epochs=max_epochs, max_steps=max_steps, limit_train_batches=10, limit_val_batches=2,
                        accumulate_grad_batches=accumulate, callbacks=[recorder, checkpoint], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(BoringModel(), ckpt_path=ckpt_path)
    return trainer, recorder.planned


@pytest.mark.parametrize("accumulate, stop_at_step, expected_total", [
    (1, 4, 30),    # mid-epoch
    (1, 10, 30),   # an epoch's end: the new epoch has not begun
    (1, 23, 30),   # mid-epoch, in a later epoch
    (3, 2, 12),    # 4 steps an epoch (3 + 3 + 3 + 1 batches)
    (3, 5, 12),    # a later epoch, with accumulation
])
def test_the_planned_length_is_the_steps_the_run_ends_with_after_any_resume(tmp_path, accumulate, stop_at_step,
                                                                             expected_total):
    straight, planned = fit(tmp_path / "straight", accumulate=accumulate)
    assert straight.global_step == expected_total
    assert set(planned) == {expected_total} and planned_optimizer_steps(straight) == expected_total
    assert expected_total == straight.estimated_stepping_batches  # without a rank change, Lightning agrees

    every = 1 if stop_at_step % (10 // accumulate) else None  # at an epoch's end the epoch-end checkpoint holds it
    stopped, _ = fit(tmp_path / "stopped", accumulate=accumulate, max_steps=stop_at_step, every_n_train_steps=every)
    assert stopped.global_step == stop_at_step
    resumed, planned = fit(tmp_path / "resumed", accumulate=accumulate,
                           ckpt_path=str(tmp_path / "stopped" / "last.ckpt"))
    assert resumed.global_step == expected_total
    assert set(planned) == {expected_total}, planned


def test_max_steps_caps_the_planned_length(tmp_path):
    trainer, planned = fit(tmp_path, max_steps=17)
    assert trainer.global_step == 17 and set(planned) == {17}
