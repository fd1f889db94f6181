"""The benchmark adapter of this recipe (``aift bench recipes``, benchmarks/recipe_step.py): quantile forecasting
windows (a week of hourly history, a day ahead) through the recipe's Lightning step and a plain PyTorch loop, the
same network, pinball loss and batch (``BenchAdapter`` in aifactory_train/recipe.py). A sample is one window:
throughput is in windows/s."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from aifactory_train.recipe import BENCH_OPTIM, import_onnxruntime, median_ms

KNOWN = ["temperature_fc", "cloud_fc", "price", "holiday"]
OBSERVED = ["temperature_obs"]
HISTORY, HORIZON = 168, 24
QUANTILES = [0.1, 0.5, 0.9]

# summary metrics a profile may set thresholds on, without the "<recipe>_" prefix: -> (what, needs a GPU)
METRICS = {
    "ratio": ("recipe/plain windows/s", False),
    "samples_per_s": ("recipe windows/s", False),
    "mfu": ("recipe model FLOP/s / peak", True),
    "joules_per_sample": ("GPU energy / window", True),
    "data_wait_fraction": ("share of step time waiting for windows (real table)", False),
}
# benchmarks/recipe_step.py's defaults (CPU: hidden 128, batch 256)
DEFAULTS = {"model": "tide_mlp", "batch_size": 256, "image_size": None, "steps": 20}


def settings(gpu: bool, quick: bool) -> dict:
    # shape: what one sample is, for the bench's log (windows have no pixels or tokens)
    if gpu:  # the GPU experiment's shape (configs/experiment/energy_forecasting_gpu.yaml)
        return dict(model="tide_mlp", batch_size=4096, image_size=None, warmup=10, split_steps=40, hidden=512, layers=4,
                    shape="history + horizon windows")
    return dict(model="tide_mlp", batch_size=128 if quick else 256, image_size=None, warmup=2 if quick else 5,
                split_steps=5 if quick else 20, shape="history + horizon windows")


def model_settings(args) -> dict:
    return {"task": "forecasting", "name": "tide_mlp", "hidden": getattr(args, "hidden", 128),
            "layers": getattr(args, "layers", 2), "dropout": 0.1, "pool": [1, 4, 24]}


def data_info() -> dict:
    from .frames import CALENDAR

    return {"features": {"past": ["target", "present", *OBSERVED, *KNOWN, *CALENDAR], "future": [*KNOWN, *CALENDAR]},
            "history": HISTORY, "horizon": HORIZON}


def build(args, device):
    return Bench(args, device)


class Bench:
    def __init__(self, args, device):
        self.args, self.device = args, device
        info = data_info()
        gen = torch.Generator().manual_seed(0)
        b = args.batch_size
        self.batches = [{
            "past": torch.randn(b, HISTORY, len(info["features"]["past"]), generator=gen).to(device),
            "future": torch.randn(b, HORIZON, len(info["features"]["future"]), generator=gen).to(device),
            "target": torch.randn(b, HORIZON, generator=gen).to(device),
            "mask": torch.ones(b, HORIZON).to(device),
        } for _ in range(8)]

    def module(self):
        from .module import EnergyForecastingModule

        return EnergyForecastingModule(model=model_settings(self.args), optim=BENCH_OPTIM,
                                       loss={"quantiles": QUANTILES}, data_info=data_info()), None

    def plain(self):
        from .model import QuantileForecaster, pinball

        m = model_settings(self.args)
        net = QuantileForecaster(HISTORY, HORIZON, len(data_info()["features"]["past"]),
                                 len(data_info()["features"]["future"]), QUANTILES, m["hidden"], m["layers"],
                                 m["dropout"], m["pool"]).to(self.device).train()
        q = torch.tensor(QUANTILES, device=self.device)

        def step(batch):
            return pinball(net(batch["past"], batch["future"]), batch["target"], batch["mask"], q)

        return net, step, None

    def datamodule(self, workers: int):
        """The recipe's DataModule on a freshly synthesised table (8 households, 120 days)."""
        from .data import EnergyDataModule
        from .synth import synthesize

        root = synthesize(Path(tempfile.mkdtemp()) / "energy", size=8, seed=0, days=120, variant="parquet")
        return EnergyDataModule(root=str(root), file="energy.parquet", known_covariates=KNOWN,
                                observed_covariates=OBSERVED, history=HISTORY, horizon=HORIZON,
                                batch_size=self.args.batch_size, num_workers=workers)

    def input_pipeline(self, workers: int) -> dict:
        """Windows/s of the train loader on its second pass (as loader_rate, whose (inputs, targets) batches these
        dict batches are not)."""
        import time

        dm = self.datamodule(workers)
        dm.setup("fit")
        loader = dm.train_dataloader()
        rates = []
        for _ in range(2):
            start, windows = time.perf_counter(), 0
            for batch in loader:
                windows += len(batch["past"])
            rates.append(windows / (time.perf_counter() - start))
        return {"workers": workers, "samples_per_s": rates[-1], "files": len(dm.datasets["train"])}

    def onnx_latency(self) -> dict:
        """CPU latency for one series (batch 1) of the exported model (onnxruntime) and of eager PyTorch."""
        from .export import DeployableForecaster, export_onnx

        onnxruntime = import_onnxruntime()
        module, _ = self.module()
        module.hparams.data_info.update({"frequency": "1h", "timezone": "Europe/Amsterdam", "known_covariates": KNOWN,
                                         "observed_covariates": OBSERVED, "scaling": {}})
        out = Path(tempfile.mkdtemp())
        export_onnx(module, out, {})
        session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        batch = self.batches[0]
        inputs = {"past": batch["past"][:1].cpu().numpy(), "future": batch["future"][:1].cpu().numpy(),
                  "loc": torch.zeros(1).numpy(), "scale": torch.ones(1).numpy()}
        eager = DeployableForecaster(module.net.eval().cpu()).eval()
        tensors = [torch.from_numpy(inputs[k]) for k in ("past", "future", "loc", "scale")]
        with torch.no_grad():
            return {"input": [1, HISTORY], "threads": torch.get_num_threads(),
                    "onnxruntime_ms": median_ms(lambda: session.run(None, inputs)),
                    "pytorch_eager_ms": median_ms(lambda: eager(*tensors))}
