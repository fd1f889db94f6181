"""`aift plan`'s view of this recipe: one training step of its segmentation net on the meta device (PlanExample)."""

from __future__ import annotations

from typing import Any

from aifactory_train.recipe import PlanExample

PLAN_CLASSES = 5  # background, road, cable_trench, manhole, building: the head is a tiny part of the net


def plan_example(model: dict[str, Any], data: dict[str, Any], batch: int, dtype) -> PlanExample:
    import torch

    from .model import build_net

    net = build_net({**model, "weights_path": None}, len(data.get("classes") or range(PLAN_CLASSES)))
    size = int(data.get("tile_size") or 256)
    inputs = torch.zeros(batch, 3, size, size, dtype=dtype)
    target = torch.zeros(batch, size, size, dtype=torch.long)

    def step():
        return torch.nn.functional.cross_entropy(net(inputs).float(), target, ignore_index=255)

    return PlanExample(net=net, step=step, shape=f"{size}x{size} px tiles, 3 bands")
