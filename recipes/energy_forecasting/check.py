"""`aift data check` for energy_forecasting: the windows per split as the DataModule built them (kept apart from
the reader). A window is named ``<series> @ <first target time>``; its hash covers the series and its target time
range, so a target period that two splits share shows as leakage (the time splits should make that impossible)."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from aifactory_train.recipe import DataDescription, SplitDescription


def describe(datamodule, cheap: bool = False) -> DataDescription:
    bank, horizon = datamodule.bank, datamodule.horizon
    splits = {}
    for split, ds in datamodule.datasets.items():
        first = pd.to_datetime(bank.times[ds.origins + 1], utc=True).strftime("%Y-%m-%dT%H:%MZ")
        last = pd.to_datetime(bank.times[ds.origins + horizon], utc=True).strftime("%Y-%m-%dT%H:%MZ")
        names = np.asarray(bank.names, dtype=object)[ds.series] if len(ds) else []
        ids = [f"{n} @ {f}" for n, f in zip(names, first)]
        hashes = [hashlib.sha256(f"{n}|{f}|{t}".encode()).hexdigest() for n, f, t in zip(names, first, last)]
        series = sorted(set(names))
        splits[split] = SplitDescription(count=len(ds), record_ids=ids, record_hashes=hashes,
                                         labels=[[n.rsplit(":", 1)[-1]] for n in names],
                                         counters={"series": len(series),
                                                   "windows dropped for gaps": datamodule.counts.windows_dropped.get(split, 0)})
    gaps = datamodule.counts.as_dict()
    invalid = {"missing steps": gaps["missing_steps"], "meter resets": gaps["meter_resets"],
               "interpolated steps": gaps["interpolated"], "covariate values filled": gaps["covariates_filled"]}
    return DataDescription(splits=splits, label_unit="window", invalid=invalid,
                           no_samples_reason="time series (the training run draws fan charts in reports/)",
                           notes=[f"validation from {datamodule.starts['val_start']}, test from "
                                  f"{datamodule.starts['test_start']} (UTC); labels: the series kind after ':'"])
