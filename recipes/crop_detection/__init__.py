"""crop_detection: weeds vs crops in field-camera images, for spot spraying.

Files: ``config.py`` (typed config schema), ``synth.py`` (demo images + COCO JSON), ``data.py`` (COCO and
HF object-detection loading, checks, box-aware augmentation), ``model.py`` (torchvision detectors from
config), ``module.py`` (training, mAP and weed recall, pictures), ``export.py`` (ONNX for the sprayer).
"""
