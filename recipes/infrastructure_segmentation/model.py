"""The segmentation network: segmentation-models-pytorch, random init or local weights; nothing is downloaded."""

from __future__ import annotations

from typing import Any

import torch

from aifactory_train.recipe import CheckpointError, read_state_dict


def build_net(model: dict[str, Any], num_classes: int) -> torch.nn.Module:
    import segmentation_models_pytorch as smp

    kinds = {"unet": smp.Unet, "fpn": smp.FPN, "deeplabv3plus": smp.DeepLabV3Plus}
    kwargs: dict[str, Any] = {"encoder_name": model.get("encoder", "resnet18"), "encoder_weights": None,
                              "encoder_depth": int(model.get("encoder_depth", 5)), "in_channels": 3,
                              "classes": num_classes}
    if model.get("name", "unet") == "unet":
        kwargs["decoder_channels"] = list(model.get("decoder_channels", [256, 128, 64, 32, 16]))
    net = kinds[model.get("name", "unet")](**kwargs)
    if model.get("weights_path"):
        load_weights(net, model["weights_path"])
    return net


def load_weights(net: torch.nn.Module, path: str) -> None:
    """A whole net's state_dict (keys ``encoder.``/``decoder.``/``segmentation_head.``), or an encoder's own, e.g.
    torchvision's ImageNet ResNet-18 file copied onto the cluster (its ``fc.`` head is not part of the encoder)."""
    state = read_state_dict(path)
    target = net if any(k.startswith("encoder.") for k in state) else net.encoder
    own = target.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.startswith("fc.")}
    misfit = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    for key in misfit if target is net else []:  # the head of another class list starts anew
        del state[key]
    missing, unexpected = target.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in misfit and (target is net.encoder or k.startswith("encoder."))]
    if missing or unexpected or (misfit and target is net.encoder):
        raise CheckpointError(f"config key 'model.weights_path': '{path}' does not fit the {type(net).__name__} "
                              f"encoder {type(net.encoder).__name__}: {len(missing)} missing keys (e.g. {missing[:3]}), "
                              f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(misfit)} of another shape")
