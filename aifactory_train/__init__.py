"""aifactory-train: the training framework of the AI Factory Groningen.

The library holds what every recipe shares (the training entry, config validation, data lineage,
tracking, callbacks, model-weight helpers); use-case code lives in ``aifactory_train.recipes``
(the top-level ``recipes/`` folder of the repository). Heavy imports (torch, lightning, mlflow)
happen inside functions so that ``aift --help`` answers instantly.
"""

__version__ = "0.1.0"
