"""infrastructure_segmentation: maps of roads, cable trenches, manholes and roofs from orthophotos and street images.

Files: ``config.py`` (the typed config schema), ``synth.py`` (a synthetic georeferenced orthophoto in three layouts),
``data.py`` (PNG folders, GeoTIFF + label raster, GeoTIFF + polygons; windowed reads), ``module.py`` (smp U-Net,
cross-entropy + Dice, IoU metrics), ``predict.py`` (tiled prediction of large rasters to a GeoTIFF mask and
polygons), ``export.py`` (ONNX).
"""
