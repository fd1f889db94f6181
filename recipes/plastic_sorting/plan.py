"""`aift plan`'s view of this recipe: one training step of its classifier on the meta device (recipe.PlanExample)."""

from __future__ import annotations

from typing import Any

from aifactory_train.recipe import PlanExample, build_torchvision_classifier

PLAN_CLASSES = 10  # the head is a small part of the model: its exact class count hardly moves the figures


def plan_example(model: dict[str, Any], data: dict[str, Any], batch: int, dtype) -> PlanExample:
    import torch

    channels = len(data.get("channels") or [0, 0, 0])
    net = build_torchvision_classifier(model["name"], PLAN_CLASSES, channels)
    size = int(data.get("image_size") or 224)
    inputs = torch.zeros(batch, channels, size, size, dtype=dtype)
    target = torch.zeros(batch, dtype=torch.long)

    def step():
        return torch.nn.functional.cross_entropy(net(inputs).float(), target)

    return PlanExample(net=net, step=step, shape=f"{size}x{size} px, {channels} bands")
