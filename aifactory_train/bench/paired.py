"""A recipe's Lightning training step and a hand-written PyTorch loop on the same model and batch, in the same
process: the loops ``aift bench recipes`` and benchmarks/recipe_step.py run on a recipe's bench adapter
(``<recipe>/bench.py``, see ``BenchAdapter`` in aifactory_train/recipe.py).

An adapter instance (``spec`` here) gives ``batches`` (in memory, on the device), ``module()`` -> (LightningModule,
gradient clip), ``plain()`` -> (net, step function returning the loss, gradient clip) and ``datamodule(workers)``;
optionally ``optim`` (lr, weight_decay), ``fused_adamw`` and ``tokens_per_sample``.
"""

from __future__ import annotations

import statistics
import time

import torch

from aifactory_train.run.timing import BENCH_OPTIM, device_sync


class PlainLoop:
    """The hand-written loop, built once and then stepped: ``run(steps)`` returns the seconds those steps took
    (device synchronised at both ends), so that it can run in blocks between blocks of the recipe."""

    def __init__(self, spec, device, precision: str, total_steps: int):
        from aifactory_train.run.schedules import warmup_cosine

        torch.manual_seed(0)
        self.spec, self.device = spec, device
        self.net, self.step_loss, self.clip = spec.plain()
        optim = getattr(spec, "optim", BENCH_OPTIM)
        fused = getattr(spec, "fused_adamw", False) and device.type == "cuda"
        self.optimizer = torch.optim.AdamW([p for p in self.net.parameters() if p.requires_grad], lr=optim["lr"],
                                           weight_decay=optim["weight_decay"], fused=fused)
        self.scheduler = warmup_cosine(self.optimizer, total_steps, 20, 0.01)  # as the recipe's
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
        self.index = 0

    def run(self, steps: int) -> float:
        device_sync(self.device)
        start = time.perf_counter()
        batches = self.spec.batches
        for _ in range(steps):
            with self.autocast:
                loss = self.step_loss(batches[self.index % len(batches)])
            loss.backward()
            if self.clip:
                torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.index += 1
        device_sync(self.device)
        return time.perf_counter() - start


def plain_loop(spec, args, device, precision: str, meter=None) -> float:
    loop = PlainLoop(spec, device, precision, args.warmup + args.steps)
    loop.run(args.warmup)
    if meter:
        meter.start()
    seconds = loop.run(args.steps)
    if meter:
        meter.stop()
    return args.steps * args.batch_size / seconds


def recipe_loop(spec, args, device, precision: str, meter=None) -> float:
    import lightning as L
    from torch.utils.data import DataLoader, Dataset

    from aifactory_train.run.callbacks import TrainingThroughput

    class InMemory(Dataset):
        def __len__(self):
            return args.warmup + args.steps

        def __getitem__(self, index):
            return spec.batches[index % len(spec.batches)]

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == args.warmup:
                device_sync(device)
                self.start = time.perf_counter()
                if meter:
                    meter.start()

        def on_train_end(self, trainer, pl_module):
            device_sync(device)
            self.seconds = time.perf_counter() - self.start
            if meter:
                meter.stop()
            self.flops_per_sample = getattr(pl_module, "flops_per_sample", None)
            if getattr(pl_module, "flops_per_token", None):
                self.flops_per_sample = pl_module.flops_per_token * spec.tokens_per_sample

    torch.manual_seed(0)
    module, clip = spec.module()
    timer = Timer()
    trainer = L.Trainer(
        accelerator=device.type, devices=1, precision=precision, max_steps=args.warmup + args.steps, max_epochs=1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=clip, callbacks=[timer, TrainingThroughput()],
    )
    trainer.fit(module, train_dataloaders=DataLoader(InMemory(), batch_size=None, num_workers=0))
    spec.flops_per_sample = timer.flops_per_sample  # as the recipe measured it (None if it does not)
    if meter is not None:
        meter.flops_per_sample = timer.flops_per_sample
    return args.steps * args.batch_size / timer.seconds


def pair_order(pairs: int) -> str:
    """Block order R (recipe) / P (plain loop): RP PR RP PR ... (ABBA), so that a load that grows or shrinks
    steadily through the run favours neither side; each pair's two blocks are back to back."""
    return "".join("RP" if i % 2 == 0 else "PR" for i in range(pairs))


def paired_summary(recipe_seconds: list[float], plain_seconds: list[float], samples_per_block: int) -> dict:
    """Recipe/plain ratios pair by pair (the same steps on each side, back to back) and their spread.

    Pure arithmetic, so that it is tested on fixed series. A pair's ratio is plain seconds / recipe seconds
    (= recipe samples/s / plain samples/s). The median is the figure; the interquartile range (inclusive
    quartiles) is the band a verdict must clear; min and max are shown, not used: one block that met another
    process's burst moves them but not the quartiles.
    """
    if len(recipe_seconds) != len(plain_seconds) or not recipe_seconds:
        raise ValueError(f"need as many recipe as plain blocks, at least one: {len(recipe_seconds)} vs {len(plain_seconds)}")
    ratios = [p / r for r, p in zip(recipe_seconds, plain_seconds)]
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    return {
        "ratio": statistics.median(ratios), "pair_ratios": ratios, "iqr": [q1, q3], "min": min(ratios), "max": max(ratios),
        "recipe_samples_per_s": statistics.median(samples_per_block / s for s in recipe_seconds),
        "plain_samples_per_s": statistics.median(samples_per_block / s for s in plain_seconds),
        "recipe_runs": [samples_per_block / s for s in recipe_seconds],
        "plain_runs": [samples_per_block / s for s in plain_seconds],
    }


def paired_blocks(spec, args, device, precision: str, pairs: int, block_seconds: float, meter=None,
                  clock: str = "wall") -> dict:
    """The recipe's Lightning step and the plain loop in alternating blocks of the same number of steps.

    One Trainer and one plain loop, each built once: the Trainer's callback runs the plain loop's blocks between
    the recipe's (``pair_order``). The last of the ``args.warmup`` (>= 1) steps of each side is timed and sets the
    block size: enough steps that a block lasts >= ``block_seconds``, so a block outlasts a scheduler hiccup; the
    median of the paired ratios then outvotes the pairs that met another process's burst.
    Returns ``paired_summary`` plus the block size, the recipe's peak GPU memory (measured before the plain loop
    exists) and its FLOPs per sample. ``meter`` (a benchmarks.energy.NvmlEnergyWindow) adds up the recipe's blocks.

    ``clock``: "wall" (perf_counter; what a GPU run must use) or "cpu": this process's CPU time
    (``time.process_time``), for CPU devices on a shared machine, where wall time also counts the time the
    scheduler gave to other processes. The summary is of the chosen clock; ``wall`` holds the wall-clock one.
    """
    import math

    import lightning as L
    from torch.utils.data import DataLoader, Dataset

    from aifactory_train.run.callbacks import TrainingThroughput

    if args.warmup < 1:
        raise ValueError("paired_blocks needs warmup >= 1: the last warm-up step sizes the blocks")
    order = pair_order(pairs)

    class Endless(Dataset):
        def __len__(self):
            return 10**9  # the callback stops the fit

        def __getitem__(self, index):
            return spec.batches[index % len(spec.batches)]

    class Pairs(L.Callback):
        def __init__(self):
            self.recipe_seconds, self.plain_seconds = [], []  # wall
            self.recipe_cpu, self.plain_cpu = [], []
            self.position = 0  # in order
            self.block_end = args.warmup  # steps done when the current recipe stretch ends
            self.started = None
            self.steps = None
            self.peak_memory = None
            self.joules = self.energy_seconds = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == args.warmup - 1:  # the recipe's last warm-up step, timed to size the blocks
                device_sync(device)
                self.started, self.started_cpu = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            done = batch_idx + 1
            if done != self.block_end:
                return
            device_sync(device)
            seconds = time.perf_counter() - self.started
            cpu_seconds = time.process_time() - self.started_cpu
            if self.steps is None:
                recipe_step = seconds
                if device.type == "cuda":
                    self.peak_memory = torch.cuda.max_memory_allocated()
                # the plain loop's warm-up, its last step timed; its schedule is long enough for every block
                self.plain = PlainLoop(spec, device, precision, args.warmup + pairs * 10**6)
                self.plain.run(args.warmup - 1)
                plain_step = self.plain.run(1)
                self.steps = max(1, math.ceil(block_seconds / min(recipe_step, plain_step)))
            else:
                self.recipe_seconds.append(seconds)
                self.recipe_cpu.append(cpu_seconds)
                if meter:
                    meter.stop()
                    self.joules += meter.joules or 0.0
                    self.energy_seconds += meter.seconds or 0.0
                self.position += 1
            while self.position < len(order) and order[self.position] == "P":
                cpu_start = time.process_time()
                self.plain_seconds.append(self.plain.run(self.steps))
                self.plain_cpu.append(time.process_time() - cpu_start)
                self.position += 1
            if self.position == len(order):
                trainer.should_stop = True
                self.flops_per_sample = getattr(pl_module, "flops_per_sample", None)
                if getattr(pl_module, "flops_per_token", None):
                    self.flops_per_sample = pl_module.flops_per_token * spec.tokens_per_sample
                return
            self.block_end = done + self.steps
            if meter:
                meter.start()
            device_sync(device)
            self.started, self.started_cpu = time.perf_counter(), time.process_time()

    torch.manual_seed(0)
    module, clip = spec.module()
    callback = Pairs()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer = L.Trainer(
        accelerator=device.type, devices=1, precision=precision, max_steps=-1, max_epochs=1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=clip, callbacks=[callback, TrainingThroughput()],
    )
    trainer.fit(module, train_dataloaders=DataLoader(Endless(), batch_size=None, num_workers=0))
    if meter is not None:
        meter.flops_per_sample = callback.flops_per_sample
        if meter.available:
            meter.joules, meter.seconds = callback.joules, callback.energy_seconds
    samples = callback.steps * args.batch_size
    wall = paired_summary(callback.recipe_seconds, callback.plain_seconds, samples)
    result = paired_summary(callback.recipe_cpu, callback.plain_cpu, samples) if clock == "cpu" else wall
    return {**result, "clock": clock, "wall": wall, "steps_per_block": callback.steps, "pairs": pairs, "order": order,
            "block_seconds": block_seconds, "peak_memory_bytes": callback.peak_memory,
            "flops_per_sample": callback.flops_per_sample}


def data_wait_split(spec, args, device, precision: str, workers: int) -> dict:
    """Train on real files through the recipe's DataModule and split each step's wall time into waiting for
    the batch and computing it (the device is synchronised at both ends, so this run is for measuring only)."""
    import lightning as L

    class StepSplit(L.Callback):
        wait = compute = 0.0
        _end = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            device_sync(device)
            now = time.perf_counter()
            if batch_idx >= args.warmup and self._end is not None:
                self.wait += now - self._end
            self._start = now

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            device_sync(device)
            now = time.perf_counter()
            if batch_idx >= args.warmup:
                self.compute += now - self._start
            self._end = now

    torch.manual_seed(0)
    module, clip = spec.module()
    split = StepSplit()
    trainer = L.Trainer(
        accelerator=device.type, devices=1, precision=precision, max_steps=args.warmup + args.steps, max_epochs=-1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=clip, callbacks=[split],
    )
    trainer.fit(module, datamodule=spec.datamodule(workers))
    total = split.wait + split.compute
    return {"workers": workers, "data_wait_s": split.wait, "compute_s": split.compute,
            "data_wait_fraction": split.wait / total if total else None}
