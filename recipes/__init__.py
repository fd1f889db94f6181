"""Use-case recipes, importable as ``aifactory_train.recipes.<name>``.

Each folder holds what is specific to one use case (its LightningModule, DataModule, config schema,
synthetic data, metrics/plots) and is meant to be read top to bottom and copied: to adapt a recipe for a
new use case, copy its folder and its ``configs/recipe/<name>.yaml`` + ``configs/data/<name>.yaml``.
"""
