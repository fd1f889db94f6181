"""plastic_sorting: the plastic type of items on a sorting line, from RGB or multispectral images.

Files: ``config.py`` (the typed config schema), ``synth.py`` (demo data), ``data.py`` (loading,
checks, transforms), ``module.py`` (model, loss, metrics, reports).
"""
