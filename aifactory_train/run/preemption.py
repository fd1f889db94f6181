"""Stopping a run cleanly when the cluster asks: SIGTERM (preemption, ``scancel``, the time limit) and the Slurm
requeue signal, both acted on at an optimizer-step boundary, with a checkpoint the continuing job resumes from.
The Slurm side (which signal, which job id) lives in ``aifactory_train.slurm_env``, shared with the sbatch
template."""

from __future__ import annotations

import lightning as L
import torch

from aifactory_train.run.resume_state import StepBoundary, is_epoch_last_batch
from aifactory_train.slurm_env import requeue_this_job


class JobStopped(BaseException):
    """Raised on every rank after the stop checkpoint is saved: the process ends without a summary, and the
    MLflow run stays open for the continuing job (``ckpt_path=auto``) to log into."""


class JobRequeued(JobStopped):
    """JobStopped, and the job was requeued with ``scontrol requeue``."""


class EnergyBudgetStop(JobStopped):
    """JobStopped because the run's measured energy reached ``energy.budget_kwh`` (run/energy_budget.py)."""


class SignalCheckpoint(L.Callback):
    """Save ``hpc_ckpt_<n>.ckpt`` at the next optimizer-step boundary the ranks agree on (with gradient
    accumulation, not between two accumulated batches: see ``StepBoundary``), then stop, when a signal asks:

    * SIGTERM (preemption, ``scancel``, the time limit, ``kill``): save and stop. No requeue from here: Slurm
      requeues a preempted job itself (``--requeue``), and a cancelled one should stay cancelled.
    * the requeue signal, under Slurm (``--signal=USR1@<s>``, sent to every rank before the time limit): save,
      ``scontrol requeue`` the job, and stop.

    Why not Lightning's own handling: its auto-requeue saves from inside the signal handler, at whatever point the
    signal lands; a checkpoint taken in the middle of a step counts that step's batch as served but not trained,
    and the requeued run then ended one step short (measured: 119 of 120 steps). On SIGTERM Lightning stops after
    the step without saving at all. Saving between steps keeps the step count, data position and RNG states
    consistent. ``train.py`` turns Lightning's Slurm handler off (``SLURMEnvironment(auto_requeue=False)``); this
    callback's SIGTERM handler replaces Lightning's, and passes the signal on to ranks Lightning started itself.

    With several ranks the ranks agree through a small all-reduce (MAX of the flags) on a gloo group of its own,
    started at one boundary and read at the next: a signal is acted on one step later, at the same step on every
    rank, and the training step never waits for it. The blocking way (an all-reduce of a device tensor and
    ``.item()``) made every step wait for the GPU to finish before the host could queue the next one. For the
    same reason Lightning's own per-step SIGTERM broadcast (Lightning 2.6, ``_broadcast_sigterm_tensor``, a
    broadcast from rank 0 and ``.item()`` on the root device; Lightning issue #21487) is turned off while this
    callback runs: its flag is set only by Lightning's SIGTERM handler, which this callback's handler replaces, so it
    could only ever send 0. An epoch's last batch is skipped as a boundary (see ``periodic_checkpoint``); the
    epoch-end checkpoint is written right after it.
    """

    NONE, BUDGET, REQUEUE, TERMINATE = 0, 1, 2, 3  # the ranks agree on the largest; BUDGET: EnergyBudget asks

    def __init__(self, requeue_signal: int | None = None) -> None:
        self.requeue_signal = requeue_signal
        self.received = self.NONE
        self._group = None  # the ranks' gloo group for the decision; None with one rank
        self._pending = None  # (work, flags) of the all-reduce started at the last boundary
        self._boundary = StepBoundary()  # boundaries are optimizer steps: accumulated gradients are in no checkpoint

    def on_train_start(self, trainer, pl_module) -> None:
        import signal

        def on_requeue(signum, frame) -> None:
            self.received = max(self.received, self.REQUEUE)

        def on_terminate(signum, frame) -> None:
            self.received = self.TERMINATE
            launcher = trainer.strategy.launcher
            if launcher is not None and hasattr(launcher, "kill"):  # ranks Lightning started as our children
                launcher.kill(signum)

        if self.requeue_signal is not None:
            signal.signal(self.requeue_signal, on_requeue)
        signal.signal(signal.SIGTERM, on_terminate)
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank calls this here, as new_group requires; gloo, so the flags never touch the GPU
            self._group = torch.distributed.new_group(backend="gloo")
            epoch_loop = trainer.fit_loop.epoch_loop
            if hasattr(epoch_loop, "_broadcast_sigterm_tensor"):  # see the class docstring
                epoch_loop._broadcast_sigterm_tensor = lambda: None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._boundary.batch_started(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if is_epoch_last_batch(trainer) or not self._boundary.stepped(trainer):
            return
        decision = self.received if self._group is None else self._agreed_decision()
        if decision == self.NONE:
            return
        self._finish_pending()
        path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        trainer.save_checkpoint(path)
        if decision == self.TERMINATE:
            raise JobStopped(str(path))
        if decision == self.BUDGET:
            raise EnergyBudgetStop(str(path))
        if trainer.is_global_zero:
            requeue_this_job(str(path))
        raise JobRequeued(str(path))

    def on_train_end(self, trainer, pl_module) -> None:
        self._finish_pending()

    def _agreed_decision(self) -> int:
        """What the ranks agreed on at the last boundary (NONE at the first), and this boundary's flags sent off.
        Every rank calls this at the same boundaries, so the all-reduces pair up and all ranks read the same
        decision; the flags are a CPU tensor, so reading the result waits for no device."""
        decision = self.NONE
        if self._pending is not None:
            work, flags = self._pending
            work.wait()
            decision = int(flags.item())
        flags = torch.tensor([self.received], dtype=torch.int32)
        work = torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, group=self._group, async_op=True)
        self._pending = (work, flags)
        return decision

    def _finish_pending(self) -> None:
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None
