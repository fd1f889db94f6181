"""Exact resume: a run stopped after a checkpoint (SIGKILL, or SIGTERM which saves first) and resumed
(ckpt_path=auto) ends with the same weights and the same logged loss curve as the run that was never interrupted:
mid-epoch, from an epoch-end checkpoint, and with DDP on 2 processes.

The stop is placed deterministically: the test freezes the run (SIGSTOP) each time last.ckpt changes, reads the
step it holds, and kills the frozen run there or lets it go on (SIGCONT)."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import aift

STEPS_PER_EPOCH = 15  # 120 training notes, batch 8 (one process); 60 per rank, 8 batches, with DDP on 2
RUN = ["recipe=clinical_notes", "trainer.max_epochs=2", "checkpoint.every_n_train_steps=4", "trainer.log_every_n_steps=1",
       "trainer.deterministic=true", "trainer.enable_progress_bar=false", "run_test=false",
       "recipe.module.rouge_max_batches=0", "trainer.limit_val_batches=1", "ckpt_path=auto"]
DDP = ["strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]


def loss_curve(uri: str, run_id: str) -> dict[int, float]:
    """train/loss per step; where a step was logged twice (before a stop and after the resume), the later value."""
    history = MlflowClient(tracking_uri=uri).get_metric_history(run_id, "train/loss")
    curve = {}
    for metric in sorted(history, key=lambda m: m.timestamp):
        curve[metric.step] = metric.value
    return curve


def weights(run: Path) -> dict[str, torch.Tensor]:
    last = run / "checkpoints" / "last.ckpt"
    if last.is_dir():  # DeepSpeed: gather the shards with the CLI a user would run
        out = run / "consolidated.ckpt"
        if not out.exists():
            result = aift("checkpoint", "consolidate", str(last), "--out", str(out), cwd=run)
            assert result.returncode == 0, result.stderr[-2000:]
        last = out
    return torch.load(last, map_location="cpu", weights_only=True)["state_dict"]


def start(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AIFT_"))}
    with log.open("w") as stderr:  # a file, not a pipe nobody reads while the run goes on
        return subprocess.Popen([sys.executable, "-m", "aifactory_train.commands.cli", *args], cwd=cwd, env=env,
                                stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)


def kill_at_checkpoint(args: list[str], cwd: Path, run: Path, wanted, stop: str = "SIGKILL") -> int:
    """Run until last.ckpt holds a step for which wanted(step) is true, then SIGKILL the run (all its ranks)
    while it is frozen, wherever in its next step that is. Returns the step of that checkpoint.
    With stop="SIGTERM", send SIGTERM there instead and let the run go on: it saves hpc_ckpt_<n> at its next step
    boundary and exits 143; returns the step of that checkpoint."""
    log = cwd / f"{run.name}.stderr"
    process = start(args, cwd, log)
    last = run / "checkpoints" / "last.ckpt"
    seen, deadline = None, time.time() + 900
    try:
        while process.poll() is None and time.time() < deadline:
            stamp = last.stat().st_mtime_ns if last.exists() else None
            if stamp is None or stamp == seen:
                time.sleep(0.005)
                continue
            os.killpg(process.pid, signal.SIGSTOP)
            seen = last.stat().st_mtime_ns
            step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
            if wanted(step) and stop == "SIGTERM":
                os.killpg(process.pid, signal.SIGTERM)  # pending until the run goes on
                os.killpg(process.pid, signal.SIGCONT)
                process.wait(timeout=600)
                assert process.returncode == 143, log.read_text()[-3000:]  # stopped, not finished
                from aifactory_train.run.checkpoints import load_checkpoint_state

                (saved,) = run.glob("hpc_ckpt_*.ckpt")
                return load_checkpoint_state(str(saved))["global_step"]
            if wanted(step):
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                return step
            os.killpg(process.pid, signal.SIGCONT)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    pytest.fail(f"no checkpoint with the wanted step was seen (exit {process.returncode}): {log.read_text()[-2000:]}")


def assert_same_run(tmp_path: Path, uri: str, straight: str, interrupted: str, from_step: int) -> None:
    a = json.loads((tmp_path / straight / "summary.json").read_text())
    b = json.loads((tmp_path / interrupted / "summary.json").read_text())
    assert 0 < from_step < a["global_step"]
    assert b["global_step"] == a["global_step"] and b["epochs"] == a["epochs"]
    assert b["mlflow_run_id"] == json.loads((tmp_path / interrupted / "tracking.json").read_text())["run_id"]
    curve_a, curve_b = loss_curve(uri, a["mlflow_run_id"]), loss_curve(uri, b["mlflow_run_id"])
    # Lightning writes a step's checkpoint (on_train_batch_end) before it hands that step's metrics to the logger,
    # so a kill right after the save can leave that one step (from_step - 1) unlogged; every other step is there.
    assert set(curve_a) - set(curve_b) <= {from_step - 1} and set(curve_b) <= set(curve_a)
    assert len(curve_a) >= a["global_step"]
    assert [(s, curve_b[s]) for s in sorted(curve_b) if s >= from_step] == \
           [(s, curve_a[s]) for s in sorted(curve_a) if s >= from_step], from_step
    for key, value in weights(tmp_path / straight).items():
        assert torch.equal(weights(tmp_path / interrupted)[key], value), key


@pytest.fixture(scope="module")
def runs(clinical_data, tmp_path_factory):
    """One MLflow store, and the uninterrupted runs (one process; DDP on 2) that the interrupted ones must match."""
    work = tmp_path_factory.mktemp("resume")
    uri = f"sqlite:///{work}/mlflow.db"
    common = [*RUN, f"data.root={clinical_data}", f"tracking.uri={uri}"]
    done = {}

    def straight(name: str, extra: list[str]) -> str:
        if name not in done:
            result = aift("train", *common, *extra, f"hydra.run.dir={name}", cwd=work)
            assert result.returncode == 0, result.stderr[-3000:]
            done[name] = name
        return name

    return {"work": work, "uri": uri, "common": common, "straight": straight}


@pytest.mark.parametrize("where", ["mid-epoch", "epoch-end"])
def test_sigkill_then_resume_gives_the_same_weights_and_loss_curve(runs, where):
    work, common = runs["work"], runs["common"]
    straight = runs["straight"]("straight", [])
    # mid-epoch: a periodic checkpoint inside the second epoch; epoch-end: the one written after the first epoch
    wanted = {"mid-epoch": lambda s: s > STEPS_PER_EPOCH and s % STEPS_PER_EPOCH != 0,
              "epoch-end": lambda s: s == STEPS_PER_EPOCH}[where]
    name = f"killed-{where}"
    step = kill_at_checkpoint(["train", *common, f"hydra.run.dir={name}"], work, work / name, wanted)
    assert not (work / name / "summary.json").exists()
    resumed = aift("train", *common, f"hydra.run.dir={name}", cwd=work)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((work / name / "summary.json").read_text())["resumed_from"].endswith("last.ckpt")
    assert_same_run(work, runs["uri"], straight, name, step)


def terminate_then_resume(runs, name: str, extra: list[str], seed: int) -> int:
    """SIGTERM at a random moment after the first checkpoint: the run saves hpc_ckpt_<n> at the next step boundary
    and exits 143; the same command then continues from it. Returns the saved step."""
    work, common = runs["work"], runs["common"]
    process = start(["train", *common, *extra, f"hydra.run.dir={name}"], work, work / f"{name}.stderr")
    last = work / name / "checkpoints/last.ckpt"
    deadline = time.time() + 900
    while not last.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(random.Random(seed).uniform(0.0, 0.5))
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=300)
    assert process.returncode == 143, (work / f"{name}.stderr").read_text()[-3000:]  # stopped, not finished
    assert "stopped on SIGTERM after saving" in (work / name / "train.log").read_text()
    (saved,) = (work / name).glob("hpc_ckpt_*.ckpt")
    from aifactory_train.run.checkpoints import load_checkpoint_state

    step = load_checkpoint_state(str(saved))["global_step"]
    assert not (work / name / "summary.json").exists()
    resumed = aift("train", *common, *extra, f"hydra.run.dir={name}", cwd=work)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((work / name / "summary.json").read_text())["resumed_from"] == str(saved)
    return step


def test_sigterm_saves_at_a_step_boundary_and_the_resume_is_exact(runs):
    straight = runs["straight"]("straight", [])
    step = terminate_then_resume(runs, "terminated", [], seed=3)
    assert_same_run(runs["work"], runs["uri"], straight, "terminated", step)


def test_deepspeed_zero2_on_two_processes_stopped_by_sigterm_resumes_exactly(runs):
    """ZeRO-2 (CPU smoke path, 2 ranks): the DeepSpeed checkpoint folder written on SIGTERM carries the
    partitioned optimizer, the LR schedule (no jump after resume) and the data position; consolidated, it evaluates. Compared with the
    uninterrupted DDP run, which ZeRO-2 matches to float32 rounding (test_strategies): a wrong batch, learning rate
    or optimizer state after the resume would differ by orders of magnitude more."""
    zero2 = [*DDP[1:], "strategy=deepspeed_zero2", "strategy.cpu_smoke=true"]
    straight = runs["straight"]("straight-ddp", DDP)
    work, name = runs["work"], "terminated-zero2"
    step = terminate_then_resume(runs, name, zero2, seed=4)
    a = json.loads((work / straight / "summary.json").read_text())
    b = json.loads((work / name / "summary.json").read_text())
    assert b["global_step"] == a["global_step"] and 0 < step < a["global_step"]
    curve_a, curve_b = loss_curve(runs["uri"], a["mlflow_run_id"]), loss_curve(runs["uri"], b["mlflow_run_id"])
    assert set(curve_a) - set(curve_b) <= {step - 1} and set(curve_b) <= set(curve_a)
    for s in curve_b:
        assert curve_b[s] == pytest.approx(curve_a[s], rel=1e-4), s
    reference, resumed = weights(work / straight), weights(work / name)
    assert set(resumed) == set(reference) and len(reference) > 10
    for key, value in resumed.items():
        torch.testing.assert_close(value, reference[key], atol=2e-5, rtol=1e-4, msg=lambda m: f"{key}: {m}")
    # the consolidated checkpoint (weights() made it with `aift checkpoint consolidate`) is an ordinary one: it evaluates
    data_root = next(a for a in runs["common"] if a.startswith("data.root="))
    result = aift("eval", "recipe=clinical_notes", data_root, f"ckpt_path={work / name / 'consolidated.ckpt'}",
                  "split=val", "trainer.limit_val_batches=1", "tracking=none", "recipe.module.rouge_max_batches=0",
                  "hydra.run.dir=eval-zero2", cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((work / "eval-zero2/eval.json").read_text())["metrics"]["val/loss"] > 0


def test_ddp_on_two_processes_resumes_exactly_in_a_later_epoch(runs):
    """DDP is where Lightning's own sampler replayed epoch 0's order after a resume in a later epoch."""
    work, common = runs["work"], runs["common"]
    straight = runs["straight"]("straight-ddp", DDP)
    steps_per_epoch = 8  # 60 notes per rank, batch 8
    name = "killed-ddp"
    step = kill_at_checkpoint(["train", *common, *DDP, f"hydra.run.dir={name}"], work, work / name,
                              lambda s: s > steps_per_epoch and s % steps_per_epoch != 0)
    resumed = aift("train", *common, *DDP, f"hydra.run.dir={name}", cwd=work)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(work, runs["uri"], straight, name, step)


# Each image recipe's data config as shipped (configs/data/<recipe>.yaml: 2 persistent workers, prefetching, random
# augmentation in the workers, its batch size), with its default model, cut to a few steps. (clinical_notes ships with
# 0 workers: the tests above run its shipped data config.) Per recipe: extra overrides, steps per epoch, the
# checkpoint step to stop at (inside the second epoch), its data fixture.
SHIPPED = {
    # 70 images, batch 32, last partial batch dropped: 2 steps per epoch; SIGTERM at step 3 saves at step 5 (step 4
    # ends an epoch, which is no stop boundary), so 3 epochs
    "plastic_sorting": (["trainer.max_epochs=3", "checkpoint.every_n_train_steps=3"], 2, 3, "plastic_data"),
    # 24 images, batch 8: 3 steps per epoch; SIGTERM at step 4 saves at step 5
    "crop_detection": (["trainer.max_epochs=2", "checkpoint.every_n_train_steps=4"], 3, 4, "crop_data"),
}


@pytest.fixture(scope="module")
def shipped(request, tmp_path_factory):
    """Per recipe: the uninterrupted run (made once, for both stops) and the command line both runs use."""
    work = tmp_path_factory.mktemp("shipped")
    made = {}

    def runs(recipe: str) -> tuple[list[str], str]:
        extra, _, _, fixture = SHIPPED[recipe]
        args = ["train", f"recipe={recipe}", f"data.root={request.getfixturevalue(fixture)}", *extra, "run_test=false",
                "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false", "tracking=none", "ckpt_path=auto"]
        if recipe not in made:
            result = aift(*args, f"hydra.run.dir={recipe}-straight", cwd=work)
            assert result.returncode == 0, result.stderr[-3000:]
            made[recipe] = f"{recipe}-straight"
        return args, made[recipe]

    return work, runs


# crop_detection only with SIGKILL: both stops go through the same loader state and worker seeding, and each of its
# runs costs about a minute of CI on 2 cores
@pytest.mark.parametrize(("recipe", "stop"), [("plastic_sorting", "SIGKILL"), ("plastic_sorting", "SIGTERM"),
                                              ("crop_detection", "SIGKILL")])
def test_the_shipped_data_config_with_workers_resumes_exactly_mid_epoch(shipped, recipe, stop):
    """Stopped inside the second epoch and resumed (ckpt_path=auto), a run with the recipe's 2 DataLoader workers
    ends with the uninterrupted run's weights, to the bit. Before, the workers' RNGs restarted on resume and every
    augmentation after it differed (plastic_sorting: 210 of 244 weight tensors differed; 0 workers was exact).
    SIGKILL frozen right after the periodic checkpoint, with the workers' prefetched batches of that epoch
    already made; SIGTERM at the same point, saved at the next step boundary."""
    work, runs = shipped
    args, straight = runs(recipe)
    _, per_epoch, stop_at, _ = SHIPPED[recipe]
    name = f"{recipe}-{stop}"
    step = kill_at_checkpoint([*args, f"hydra.run.dir={name}"], work, work / name, lambda s: s == stop_at, stop)
    assert per_epoch < step < 2 * per_epoch or (stop == "SIGTERM" and 2 * per_epoch < step < 3 * per_epoch), step
    resumed = aift(*args, f"hydra.run.dir={name}", cwd=work)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((work / name / "summary.json").read_text())
    assert summary["resumed_from"].endswith("hpc_ckpt_1.ckpt" if stop == "SIGTERM" else "last.ckpt")
    assert summary["global_step"] == json.loads((work / straight / "summary.json").read_text())["global_step"]
    for run in (straight, name):  # last.ckpt is the end of training, also after an epoch that did not improve
        last = torch.load(work / run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
        assert last["global_step"] == summary["global_step"], run
    config = (work / name / ".hydra" / "config.yaml").read_text()
    assert "num_workers: 2" in config  # the shipped workers, as the failure needed
    reference, after = weights(work / straight), weights(work / name)
    assert set(after) == set(reference)
    different = [key for key, value in reference.items() if not torch.equal(after[key], value)]
    assert different == [], f"{len(different)} of {len(reference)} tensors differ, e.g. {different[:3]}"


class RandomCrops(torch.utils.data.Dataset):
    """Each item: its index and a torch, a numpy and a Python draw, as an augmentation in a worker makes them."""

    def __len__(self):
        return 24

    def __getitem__(self, index):
        import numpy as np

        return torch.tensor([float(index), torch.rand(()).item(), np.random.rand(), random.random()])


def test_worker_augmentation_resumes_at_the_next_batch_whatever_the_workers():
    """The loader alone: its state taken mid-epoch (2 workers, 4 batches prefetched), loaded into a new loader,
    gives the rest of the epoch and the next one exactly as the uninterrupted loader does, and as 0 and 1 workers
    do; with 0 workers the data does not move the main process's RNGs (dropout, MixUp draw from them). Before, the
    new workers restarted their RNGs, and each worker count gave other draws."""
    from aifactory_train.run.loaders import ResumableDataLoader, ResumableSampler

    def loader(workers: int):
        data = RandomCrops()
        return ResumableDataLoader(data, batch_size=4, num_workers=workers, persistent_workers=workers > 0,
                                   sampler=ResumableSampler(data, num_replicas=1, rank=0, shuffle=True, seed=3))

    def epochs(data_loader, first: int, count: int, skip: int = 0):
        batches = []
        for epoch in range(first, first + count):
            data_loader.sampler.set_epoch(epoch)
            batches += list(data_loader)[skip if epoch == first else 0:]
        return batches

    straight = epochs(loader(2), 0, 2)
    assert len(straight) == 12 and len({b[0, 1].item() for b in straight}) == 12
    for workers in (0, 1):
        assert all(torch.equal(a, b) for a, b in zip(epochs(loader(workers), 0, 2), straight, strict=True)), workers
    interrupted = loader(2)
    interrupted.sampler.set_epoch(0)
    batches = iter(interrupted)
    head = [next(batches) for _ in range(2)]
    state = interrupted.state_dict()
    resumed = loader(2)
    resumed.load_state_dict(state)
    rest = list(resumed)  # the epoch from its third batch on
    tail = epochs(resumed, 1, 1)
    assert all(torch.equal(a, b) for a, b in zip([*head, *rest, *tail], straight, strict=True))

    before = torch.get_rng_state()
    list(loader(0))
    list(loader(1))  # a new iterator draws its workers' base seed: from the loader's own generator
    assert torch.equal(before, torch.get_rng_state())


def test_checkpoint_is_written_atomically(tmp_path):
    """A kill during saving leaves the previous checkpoint loadable: the new one goes to .tmp first."""
    from aifactory_train.run.resume_state import AtomicCheckpointIO

    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, path)

    class Boom(Exception):
        pass

    original = torch.save

    def half_written(obj, target, *args, **kwargs):
        Path(target).write_bytes(b"\x00" * 10)  # a partial file, then the process "dies"
        raise Boom

    torch.save = half_written
    try:
        with pytest.raises(Boom):
            io.save_checkpoint({"step": 2}, path)
    finally:
        torch.save = original
    assert torch.load(path, weights_only=True) == {"step": 1}


def test_ckpt_path_auto_starts_fresh_without_a_checkpoint(tmp_path):
    from aifactory_train.run.checkpoints import resolve_checkpoint

    assert resolve_checkpoint("auto", tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    torch.save({"global_step": 50}, tmp_path / "hpc_ckpt_1.ckpt")
    time.sleep(0.01)
    torch.save({"global_step": 40}, tmp_path / "checkpoints/last.ckpt")
    assert resolve_checkpoint("auto", tmp_path) == str(tmp_path / "hpc_ckpt_1.ckpt")  # the furthest, not the newest
    torch.save({"global_step": 70}, tmp_path / "checkpoints/last.ckpt")
    assert resolve_checkpoint("auto", tmp_path) == str(tmp_path / "checkpoints/last.ckpt")


class SIGTERMDisposition(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        return int(signal.getsignal(signal.SIGTERM) == signal.SIG_IGN)


def test_dataloader_workers_leave_sigterm_to_the_main_process():
    from aifactory_train.run.loaders import ResumableDataLoader

    calls = []
    loader = ResumableDataLoader(SIGTERMDisposition(), batch_size=2, num_workers=1,
                                 worker_init_fn=lambda worker_id: calls.append(worker_id))
    assert next(iter(loader)).tolist() == [1, 1]  # ignored in the worker
    assert signal.getsignal(signal.SIGTERM) != signal.SIG_IGN  # not in this process


class Tiny(L.LightningModule):
    """A one-weight model on ``samples`` numbers, batches of 4, through the framework's resumable loader."""

    def __init__(self, samples: int = 20):
        super().__init__()
        self.samples = samples
        self.layer = torch.nn.Linear(1, 1)

    def training_step(self, batch, batch_idx):
        return (self.layer(batch) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self):
        from aifactory_train.run.loaders import ResumableDataLoader, shuffled

        data = torch.arange(self.samples, dtype=torch.float32).unsqueeze(1) / self.samples
        return ResumableDataLoader(data, batch_size=4, sampler=shuffled(data, self.trainer))


class RecordSaves(L.Callback):
    """(global step, epoch-end state?, batches into the epoch) of every checkpoint written."""

    def __init__(self):
        self.saved = []

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        epoch, batches = trainer.fit_loop.epoch_progress.current, trainer.fit_loop.epoch_loop.batch_progress
        inside_epoch_end = batches.is_last_batch and epoch.processed < epoch.started
        self.saved.append((checkpoint["global_step"], inside_epoch_end, batches.current.ready))


def test_periodic_checkpoints_skip_an_epochs_last_batch(tmp_path):
    """The one state Lightning 2.6 cannot resume exactly from (saved after an epoch's last batch, before the epoch
    ends) is never written by the periodic checkpoint; the other multiples of N are."""
    from aifactory_train.run.resume_state import periodic_checkpoint

    def fit(every: int) -> list[tuple[int, bool]]:
        record = RecordSaves()
        L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                  default_root_dir=tmp_path, callbacks=[periodic_checkpoint(tmp_path / f"ck{every}", every, None),
                                                        record]).fit(Tiny())  # 5 batches per epoch
        return [(step, bad) for step, bad, _ in record.saved]

    assert not any(bad for _, bad in fit(5))
    assert [(3, False), (6, False), (9, False)] == [s for s in fit(3) if s[0] < 10]


def test_a_timed_checkpoint_waits_for_the_accumulated_step(tmp_path):
    """checkpoint.every_n_minutes is due at every batch here (a microsecond), but with 3 batches accumulated per
    step only a batch that stepped is saved: the gradients of the 1 or 2 batches since are in no checkpoint."""
    from aifactory_train.run.resume_state import periodic_checkpoint

    record = RecordSaves()
    every = periodic_checkpoint(tmp_path / "ck", None, 1e-8)
    L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
              accumulate_grad_batches=3, default_root_dir=tmp_path,
              callbacks=[every, record]).fit(Tiny(samples=40))  # 10 batches per epoch, steps after 3, 6, 9, 10
    timed = [(step, ready) for step, _, ready in record.saved]
    assert timed[:3] == [(1, 3), (2, 6), (3, 9)]  # not after batches 1, 2, 4, ... (and not the epoch's last)
    assert all(ready % 3 == 0 for _, ready in timed)


def test_sigterm_between_accumulated_batches_saves_after_the_step_and_resumes_exactly(tmp_path):
    """A real SIGTERM after the 3rd batch, with 2 batches per step: the stop checkpoint is written after the 4th,
    where the step is complete, and the resumed run ends with the uninterrupted run's weights. Saved after the 3rd,
    the resume stepped on the 4th batch's gradients alone (other weights: the test failed so)."""
    import os as _os

    from aifactory_train.run.preemption import JobStopped, SignalCheckpoint
    from aifactory_train.run.resume_state import RNGStateCallback

    class SignalAfter(L.Callback):
        def __init__(self, batches: int):
            self.batches = batches

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.fit_loop.epoch_loop.batch_progress.total.ready == self.batches:
                _os.kill(_os.getpid(), signal.SIGTERM)

    def fit(root: Path, extra=(), ckpt_path=None) -> Tiny:
        L.seed_everything(1)
        model = Tiny(samples=40)
        L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                  enable_checkpointing=False, accumulate_grad_batches=2, default_root_dir=root,
                  callbacks=[*extra, SignalCheckpoint(), RNGStateCallback()]).fit(model, ckpt_path=ckpt_path,
                                                                                  weights_only=True)
        return model

    previous = signal.getsignal(signal.SIGTERM)  # every fit installs SignalCheckpoint's handler in this process
    try:
        straight = fit(tmp_path / "straight")
        with pytest.raises(JobStopped) as stopped:
            fit(tmp_path / "stopped", extra=[SignalAfter(3)])
        saved = torch.load(str(stopped.value), map_location="cpu", weights_only=True)
        assert saved["global_step"] == 2
        assert saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["ready"] == 4
        resumed = fit(tmp_path / "stopped", ckpt_path=str(stopped.value))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert torch.equal(resumed.layer.weight, straight.layer.weight)
    assert torch.equal(resumed.layer.bias, straight.layer.bias)


def test_ranks_agree_on_a_stop_without_waiting_on_each_other_every_step(tmp_path):
    """With several ranks a signal must stop all of them at the same step, but the agreement must not make each
    step wait: a blocking all-reduce of a device tensor plus `.item()` (as SignalCheckpoint did), and Lightning's
    own per-step SIGTERM broadcast, each made the host wait for the GPU to finish a step before it could queue the
    next. tests/assets/two_rank_stop.py (2 CPU ranks, 12 steps) lists the collectives made during training batches
    (DDP's gradient all-reduce is C++ and not among them); before, it listed a blocking broadcast and a blocking
    all_reduce per step. A real SIGTERM to rank 1 alone stops both ranks at the same step, one step later."""
    script = Path(__file__).parent / "assets" / "two_rank_stop.py"

    def run(name: str, signal_at: int) -> list[dict]:
        out = tmp_path / name
        out.mkdir()
        result = subprocess.run([sys.executable, str(script), str(out), str(signal_at)], cwd=tmp_path,
                                capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]

    for rank in run("through", signal_at=-1):
        assert rank["stopped_at"] is None
        assert [c for c in rank["calls"] if not c["async"]] == []
        decisions = [(c["op"], c["group"], c["batch"]) for c in rank["calls"]]
        assert decisions == [("all_reduce", "gloo", batch) for batch in range(11)]  # each batch's end but the last

    assert [rank["stopped_at"] for rank in run("stopped", signal_at=4)] == [6, 6]  # signalled after step 5
    assert len(list((tmp_path / "stopped").glob("hpc_ckpt_*.ckpt"))) == 1


def test_an_epoch_resumed_on_other_rank_counts_visits_every_sample_once():
    """The sampler alone, as the ranks of three jobs of one epoch use it: 2 ranks take 10 samples each, 3 ranks
    continue and take 4 each, 1 rank finishes. Every sample of the epoch is seen exactly once."""
    from aifactory_train.run.loaders import ResumableSampler

    dataset = list(range(62))
    seen: list[int] = []

    def ranks(count: int, state: dict | None, take: int | None):
        samplers = [ResumableSampler(dataset, num_replicas=count, rank=r, shuffle=True, seed=7) for r in range(count)]
        for sampler in samplers:
            sampler.set_epoch(3)
            if state is not None:
                sampler.load_state_dict(state)
        iterators = [iter(s) for s in samplers]
        for _ in range(take if take is not None else len(samplers[0].remaining_share())):
            for it in iterators:
                seen.append(next(it))
        if take is None:  # the last job: its shares are used up
            assert all(next(it, None) is None for it in iterators)
        return samplers[0].state_dict()

    state = ranks(2, None, take=10)
    assert state["yielded"] == 10 and state["num_replicas"] == 2
    state = ranks(3, state, take=4)
    assert state["cuts"] == [[20, 2]] and state["num_replicas"] == 3
    ranks(1, state, take=None)
    assert sorted(seen) == dataset  # 20 + 12 + 30: none twice, none left out
    assert seen[:20] != sorted(seen[:20])  # and shuffled
    later = ResumableSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=7)
    later.set_epoch(3)
    later.load_state_dict(state)
    assert later.cuts == [(20, 2), (12, 3)]
    later.set_epoch(4)  # the next epoch: whole again, on the new rank count
    assert not later.cuts and sorted(later) == dataset


@pytest.mark.parametrize("case", ["2 ranks -> 1", "1 rank -> 2", "2 ranks -> 1, global batch 16"])
def test_a_mid_epoch_resume_on_another_rank_count_finishes_that_epoch_exactly(runs, case):
    """Killed in the second epoch, resumed on another number of ranks: the rest of that epoch (each remaining note
    once, split over the new ranks) is trained, no batch more or less. 120 notes, batch 8.
    2 -> 1: killed at step 12 (8 + 4 batches of 2 x 8 notes: 64 seen), 56 left: 7 steps on one rank, 19 in all.
    1 -> 2: killed at step 20 (15 + 5 batches of 8: 40 seen), 80 left: 5 steps of 2 x 8, 25 in all.
    2 -> 1 with trainer.global_batch_size=16: the one rank accumulates 2 batches per step, so the 7 batches left
    make 4 steps (2 + 2 + 2 and the epoch's last), 16 in all, each of 16 notes but the last.
    The learning-rate schedule ends with the run: after the resume its cosine runs over those 19 (25, 16) steps,
    not over the 30 (16, 16) that two epochs on the new rank count would have."""
    fixed = ["trainer.global_batch_size=16"] if "global batch" in case else []
    work, common = runs["work"], [*runs["common"], "optim.warmup_steps=2", *fixed]
    before, after, kill_at, steps_left, batches_left = (
        {"2 ranks -> 1": (DDP, [], 12, 7, 7), "1 rank -> 2": ([], DDP, 20, 5, 5),
         "2 ranks -> 1, global batch 16": (DDP, [], 12, 4, 7)}[case])
    name = "elastic-" + ("down" if after == [] else "up") + ("-fixed" if fixed else "")
    step = kill_at_checkpoint(["train", *common, *before, f"hydra.run.dir={name}"], work, work / name,
                              lambda s: s == kill_at)
    assert step == kill_at
    resumed = aift("train", *common, *after, f"hydra.run.dir={name}", cwd=work)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((work / name / "summary.json").read_text())
    ranks = 2 if after else 1
    assert summary["num_processes"] == ranks
    assert summary["global_step"] == kill_at + steps_left and summary["epochs"] == 2
    assert summary["train_samples"] == batches_left * 8 * ranks  # exactly what the epoch had left
    assert summary["batch"] == {"per_device": 8, "ranks": ranks, "accumulate_grad_batches": 2 if fixed else 1,
                                "global": 16 if fixed else 8 * ranks, "global_fixed": bool(fixed)}
    log = (work / name / "train.log").read_text()
    assert f"resumed on {ranks} ranks mid-epoch: {batches_left} batches per rank left in this epoch" in log
    assert ("the global batch stays 16 samples per step (trainer.global_batch_size; 2 batches accumulated per step "
            "now)" if fixed else "the global batch (samples per step) changes with the rank count") in log
    run = MlflowClient(tracking_uri=runs["uri"]).get_run(summary["mlflow_run_id"])
    assert run.data.tags["aift.batch.global"] == str(summary["batch"]["global"])  # this job's, not the first's
    # the LR each step after the resume trained with (the resume's first one was restored from the checkpoint):
    # AdamW 0.003, 2 warmup steps, then cosine to 0.1 x over the run's real length
    history = MlflowClient(tracking_uri=runs["uri"]).get_metric_history(summary["mlflow_run_id"], "lr-AdamW")
    logged = {m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)}
    total = kill_at + steps_left
    after_resume = range(kill_at + 1, total)
    assert [logged[s] for s in after_resume] == pytest.approx(
        [0.003 * (0.1 + 0.45 * (1 + math.cos(math.pi * (s - 2) / (total - 2)))) for s in after_resume], rel=1e-6)
