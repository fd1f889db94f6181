"""Model helpers every recipe shares: build torchvision models without downloading anything, load
local weights, and adapt the first convolution to another number of input bands."""

from __future__ import annotations

import logging
from pathlib import Path

from aifactory_train.errors import CheckpointError, ConfigError
from aifactory_train.locations import cache_dir

log = logging.getLogger(__name__)

# Families of torchvision classifiers the recipes support (all have a single first Conv2d).
CLASSIFIER_FAMILIES = ("resnet", "wide_resnet", "efficientnet", "convnext", "mobilenet")


def classifier_names() -> list[str]:
    """torchvision's classifiers of the supported families. Config validation asks for them before a run starts;
    importing torchvision for the list costs seconds, so the list is kept per torchvision version in the cache
    folder ($AIFT_CACHE_DIR, default ~/.cache/aifactory_train) and a wrong config fails at once."""
    import json
    import os
    from importlib.metadata import PackageNotFoundError, version

    try:
        cache = cache_dir() / f"torchvision-{version('torchvision')}-classifiers.json"
    except PackageNotFoundError:
        cache = None
    if cache is not None and cache.is_file():
        try:
            return json.loads(cache.read_text())
        except (OSError, ValueError):
            pass  # half a file or unreadable: computed (and written) again below
    import torchvision

    names = sorted(n for n in torchvision.models.list_models(module=torchvision.models)
                   if n.startswith(CLASSIFIER_FAMILIES))
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(names))
            tmp.replace(cache)
        except OSError:
            pass  # a read-only home: the list is computed again next time
    return names


def build_torchvision_classifier(name: str, num_classes: int, in_channels: int = 3, weights_path: str | None = None):
    """A torchvision classifier built with ``weights=None``; optional local weights; ``in_channels`` bands.

    Local weights are loaded before the first convolution is widened, so pretrained RGB filters are kept
    (see :func:`adapt_first_conv`).
    """
    import torchvision

    valid = classifier_names()
    if name not in valid:
        raise ConfigError(f"config key 'model.name': unknown model '{name}'; valid models: {', '.join(valid)}")
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if weights_path:
        load_local_weights(model, weights_path, key="model.weights_path")
    if in_channels != 3:
        adapt_first_conv(model, in_channels)
    return model


def read_state_dict(path: str | Path, key: str = "model.weights_path") -> dict:
    """Read a state_dict from .safetensors, or a torch file (plain, or under 'state_dict'/'model')."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"config key '{key}': weights file '{path}' does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not a weights file"
        raise CheckpointError(f"config key '{key}': '{path}' is not a readable torch weights file: {err}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise CheckpointError(f"config key '{key}': '{path}' holds a {type(state).__name__}, not a state_dict")
    # A Lightning checkpoint of an aift recipe keeps the torch model under `net.` (the recipes' convention).
    if state and all(k.startswith("net.") for k in state):
        state = {k[len("net."):]: v for k, v in state.items()}
    return state


def load_local_weights(model, path: str | Path, key: str = "model.weights_path") -> list[str]:
    """Load weights whose names match; re-initialise the ones whose shapes differ (e.g. the head).

    Returns the names that were not loaded. Fails if names are missing, which means another architecture.
    """
    state = read_state_dict(path, key)
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    for k in mismatched:
        del state[k]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in mismatched]
    if missing or unexpected:
        raise CheckpointError(
            f"config key '{key}': '{path}' does not fit model {type(model).__name__}: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    if mismatched:
        log.info("weights %s: re-initialised %d tensors whose shape differs: %s", path, len(mismatched), mismatched)
    return mismatched


def adapt_first_conv(model, in_channels: int) -> None:
    """Replace the model's first Conv2d by one with ``in_channels`` inputs.

    The RGB filters are kept; each extra band gets the mean of the RGB filters, a common start for
    multispectral fine-tuning. torchvision has no helper for this (timm's `in_chans` is timm-only).
    """
    import torch
    from torch import nn

    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                new = nn.Conv2d(
                    in_channels,
                    child.out_channels,
                    kernel_size=child.kernel_size,
                    stride=child.stride,
                    padding=child.padding,
                    dilation=child.dilation,
                    groups=child.groups,
                    bias=child.bias is not None,
                    padding_mode=child.padding_mode,
                )
                with torch.no_grad():
                    old = child.weight
                    keep = min(in_channels, old.shape[1])
                    new.weight[:, :keep] = old[:, :keep]
                    if in_channels > keep:
                        new.weight[:, keep:] = old.mean(dim=1, keepdim=True)
                    if child.bias is not None:
                        new.bias.copy_(child.bias)
                setattr(parent, child_name, new)
                return
    raise ConfigError(f"model {type(model).__name__} has no Conv2d to adapt to {in_channels} input channels")
