"""torchvision detectors from config: always ``weights=None, weights_backbone=None``; local weights by path."""

from __future__ import annotations

import inspect

from aifactory_train.errors import ConfigError

# name -> (torchvision builder, accepts min_size/max_size, anchor generator keyword or None)
DETECTORS = {
    "fasterrcnn_resnet50_fpn_v2": ("fasterrcnn_resnet50_fpn_v2", True, "rpn_anchor_generator"),
    "fasterrcnn_mobilenet_v3_large_fpn": ("fasterrcnn_mobilenet_v3_large_fpn", True, "rpn_anchor_generator"),
    "fasterrcnn_mobilenet_v3_large_320_fpn": ("fasterrcnn_mobilenet_v3_large_320_fpn", True, "rpn_anchor_generator"),
    "retinanet_resnet50_fpn_v2": ("retinanet_resnet50_fpn_v2", True, "anchor_generator"),
    "fcos_resnet50_fpn": ("fcos_resnet50_fpn", True, None),
    "ssdlite320_mobilenet_v3_large": ("ssdlite320_mobilenet_v3_large", False, None),
}


def build_detector(name: str, num_classes: int, min_size: int | None = None, max_size: int | None = None,
                   anchor_sizes: list[list[int]] | None = None, weights_path: str | None = None,
                   score_threshold: float | None = None, extra: dict | None = None):
    """``num_classes`` counts the background (K classes → K + 1), as torchvision's detectors expect."""
    import torchvision
    from torchvision.models import detection

    if name not in DETECTORS:
        raise ConfigError(f"config key 'model.name': unknown detector '{name}'; valid: {', '.join(DETECTORS)}")
    builder_name, sized, anchor_key = DETECTORS[name]
    kwargs = {"weights": None, "weights_backbone": None, "num_classes": num_classes}
    if sized:
        kwargs.update({k: v for k, v in (("min_size", min_size), ("max_size", max_size)) if v})
    elif min_size or max_size:
        raise ConfigError(f"config key 'model.min_size/max_size': {name} has a fixed input size (320 px); leave them null")
    if score_threshold is not None:
        kwargs["box_score_thresh" if name.startswith("fasterrcnn") else "score_thresh"] = score_threshold
    model_class = {"fasterrcnn": detection.FasterRCNN, "retinanet": detection.RetinaNet, "fcos": detection.FCOS,
                   "ssdlite320": detection.ssd.SSD}[name.split("_")[0]]
    # some detector classes swallow unknown keyword arguments (FCOS), so check against the named ones
    accepted = sorted(p for p in inspect.signature(model_class.__init__).parameters
                      if p not in ("self", "backbone", "num_classes", "kwargs"))
    for key in extra or {}:
        if key in kwargs or key in ("min_size", "max_size"):
            raise ConfigError(f"config key 'model.extra.{key}': set it with its own key, not through model.extra")
        if key not in accepted:
            raise ConfigError(f"config key 'model.extra.{key}': {model_class.__name__} has no such argument; "
                              f"valid: {', '.join(accepted)}")
    try:
        model = getattr(torchvision.models.detection, builder_name)(**kwargs, **(extra or {}))
    except TypeError as err:
        raise ConfigError(f"config key 'model.extra': {builder_name} does not take {sorted(extra or {})}: {err}") from None
    if anchor_sizes:
        if anchor_key is None:
            raise ConfigError(f"config key 'model.anchor_sizes': {name} has no configurable anchors; "
                              f"anchor sizes apply to {', '.join(n for n, d in DETECTORS.items() if d[2])}")
        owner = model.rpn if anchor_key == "rpn_anchor_generator" else model
        default = owner.anchor_generator
        shape = [len(level) for level in default.sizes]
        if [len(level) for level in anchor_sizes] != shape:
            raise ConfigError(f"config key 'model.anchor_sizes': {name} needs {len(shape)} lists (one per feature "
                              f"level) of {shape[0]} sizes each, like its default {[list(s) for s in default.sizes]}; "
                              f"got {anchor_sizes}")
        # same anchors per location, so the heads keep their shapes; only the sizes change
        owner.anchor_generator = detection.anchor_utils.AnchorGenerator(
            tuple(tuple(s) for s in anchor_sizes), default.aspect_ratios
        )
    if weights_path:
        from aifactory_train.models import load_local_weights

        load_local_weights(model, weights_path, key="model.weights_path")
    return model
