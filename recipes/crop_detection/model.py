"""torchvision detectors from config: always ``weights=None, weights_backbone=None``; local weights by path, for the
whole detector (``model.weights_path``) or its backbone only (``model.backbone_weights_path``)."""

from __future__ import annotations

import inspect

from aifactory_train.recipe import ConfigError

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
                   score_threshold: float | None = None, extra: dict | None = None,
                   backbone_weights_path: str | None = None, trainable_backbone_layers: int | None = None):
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
    if weights_path and backbone_weights_path:
        raise ConfigError("config keys 'model.weights_path' and 'model.backbone_weights_path': set one; whole-detector "
                          "weights already hold a backbone")
    if backbone_weights_path:
        load_backbone_weights(model, backbone_weights_path)
        freeze_backbone(model, trainable_backbone_layers)
    if weights_path:
        from aifactory_train.recipe import load_local_weights

        load_local_weights(model, weights_path, key="model.weights_path")
    return model


# The backbone's classifier weights as torchvision's ImageNet files name them -> the detector's backbone body.
# ResNet: the same names without the classifier (fc); MobileNetV3: `features.N.*` -> `N.*`, without `classifier`.
_CLASSIFIER_PREFIXES = ("fc.", "classifier.")


def load_backbone_weights(model, path: str) -> None:
    """Load an ImageNet classifier's weights (e.g. torchvision's ``resnet50-0676ba61.pth`` or
    ``mobilenet_v3_large-8738ca79.pth`` copied onto the cluster) into the detector's backbone; every backbone
    tensor must be in the file, with its shape (another architecture fails, naming what is missing)."""
    from aifactory_train.recipe import CheckpointError
    from aifactory_train.recipe import read_state_dict

    body = _backbone_body(model, "model.backbone_weights_path")
    state = read_state_dict(path, key="model.backbone_weights_path")
    state = {k[len("features."):] if k.startswith("features.") else k: v for k, v in state.items()
             if not k.startswith(_CLASSIFIER_PREFIXES)}
    own = body.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong_shape:
        raise CheckpointError(
            f"config key 'model.backbone_weights_path': '{path}' does not fit this detector's backbone: "
            f"{len(missing)} missing tensors (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(wrong_shape)} of another shape "
            f"(e.g. {wrong_shape[:3]}); it takes the ImageNet classifier weights of the backbone the detector is named for")
    body.load_state_dict(state)


def backbone_stages(model) -> list[list]:
    """The backbone's stages, first to last, grouped as torchvision's ``trainable_backbone_layers`` counts them."""
    body = _backbone_body(model, "model.trainable_backbone_layers")
    if "layer4" in body:  # ResNet: the stem, then layer1-4
        return [[body["conv1"], body["bn1"]], [body["layer1"]], [body["layer2"]], [body["layer3"]], [body["layer4"]]]
    blocks = list(body.values())  # MobileNetV3's features; a stage starts at each strided block, the last is alone
    starts = [0] + [i for i, b in enumerate(blocks) if getattr(b, "_is_cn", False)] + [len(blocks) - 1]
    return [blocks[a:b] for a, b in zip(starts, starts[1:] + [len(blocks)])]


def freeze_backbone(model, trainable_layers: int | None) -> None:
    """As torchvision fine-tunes from a pretrained backbone: only the last ``trainable_layers`` stages train
    (default 3), and the backbone's BatchNorm layers keep their pretrained statistics and scales (their affine
    parameters are frozen here; the module keeps them in eval mode, see ``frozen_norm_layers``)."""
    from aifactory_train.recipe import ConfigError

    stages = backbone_stages(model)
    trainable = 3 if trainable_layers is None else trainable_layers
    if not 0 <= trainable <= len(stages):
        raise ConfigError(f"config key 'model.trainable_backbone_layers': {trainable_layers} is out of range; "
                          f"this backbone has {len(stages)} stages: 0 (all frozen) to {len(stages)} (all train)")
    for stage in stages[:len(stages) - trainable]:
        for block in stage:
            block.requires_grad_(False)
    for norm in frozen_norm_layers(model):
        norm.requires_grad_(False)


def frozen_norm_layers(model) -> list:
    import torch

    return [m for m in model.backbone.body.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def _backbone_body(model, key: str):
    body = getattr(getattr(model, "backbone", None), "body", None)
    if body is None:
        raise ConfigError(f"config key '{key}': this detector's backbone ({type(model.backbone).__name__}) is not "
                          f"a ResNet or MobileNet-FPN body; start it from whole-detector weights (model.weights_path)")
    return body
