"""`aift plan`'s view of this recipe: one training step of its detector's backbone on the meta device
(recipe.PlanExample)."""

from __future__ import annotations

from typing import Any

from aifactory_train.recipe import PlanExample

from .model import build_detector

PLAN_CLASSES = 2  # + background; the heads are a small part of the model


def plan_example(model: dict[str, Any], data: dict[str, Any], batch: int, dtype) -> PlanExample:
    import torch

    net = build_detector(model["name"], PLAN_CLASSES + 1, min_size=model.get("min_size"),
                         max_size=model.get("max_size"))
    size = int(model.get("min_size") or data.get("image_size") or 320)
    inputs = torch.zeros(batch, 3, size, size, dtype=dtype)

    def step():
        return sum(feature.float().mean() for feature in net.backbone(inputs).values())

    return PlanExample(net=net, step=step, shape=f"{size}x{size} px",
                       notes=["detection: activations and FLOPs of the backbone + FPN only (the heads' depend on the "
                              "boxes)"])
