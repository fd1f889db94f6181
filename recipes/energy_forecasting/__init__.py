"""energy_forecasting: probabilistic day-ahead forecasts of household load, solar production (and anything else
measured per interval) for home-battery planning, with an honest rolling-origin backtest.

Files: ``config.py`` (the typed config schema), ``synth.py`` (demo data), ``frames.py`` (reading and checking
long-format tables, UTC/local time, gaps, scaling, windows: pure pandas/numpy), ``data.py`` (the DataModule),
``model.py`` (the network), ``module.py`` (loss, backtest metrics, reports), ``predict.py`` (forecasts and the
battery plan), ``export.py`` (ONNX), ``check.py`` (`aift data check`), ``bench.py`` (the benchmark adapter),
``gpu.sh`` (the GPU checks).
"""
