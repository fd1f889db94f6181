"""Everything this package reads from a Slurm job's environment, and the requeue signal: one place, shared with the
sbatch template (``slurm/sbatch.sh.j2`` gets ``REQUEUE_SIGNAL_NAME`` from ``aift launch``).

These variables say what the job *is* for bookkeeping (energy ledgers, requeue); they never decide what a user may
do: the usage terms take the job from slurmctld (``records.usage_terms.verified_slurm_job``)."""

from __future__ import annotations

import os
import re
import signal
import subprocess

# `#SBATCH --signal=USR1@<seconds>`: sent to every rank before the time limit; the run saves and requeues itself
REQUEUE_SIGNAL = signal.SIGUSR1
REQUEUE_SIGNAL_NAME = REQUEUE_SIGNAL.name.removeprefix("SIG")


def in_slurm_job() -> bool:
    """What Lightning's ``SLURMEnvironment.detect`` answers: a job step of Slurm (not an interactive ``salloc``
    shell)."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return SLURMEnvironment.detect()


def job_id() -> str | None:
    """``$SLURM_JOB_ID``, for records only."""
    return os.environ.get("SLURM_JOB_ID")


def requeue_id() -> str:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` for an array task, else the job id."""
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID", "")


def requeue_this_job(saved: str) -> None:
    """``scontrol requeue`` this job; ``saved`` (the checkpoint just written) is named if it fails."""
    job = requeue_id()
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"saved {saved}, but `scontrol requeue {job}` failed ({result.returncode}): "
                           f"{result.stderr.strip()}; resubmit the same `aift launch` (ckpt_path=auto resumes)")


SLURM_NAME = re.compile(r"[A-Za-z0-9_.+-]+")  # job, partition, account, QOS names
SLURM_NAME_VALID = "letters, digits and _ . + -"
