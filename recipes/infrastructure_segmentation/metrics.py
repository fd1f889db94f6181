"""Boundary IoU (Cheng et al., 2021) per class: IoU of the bands within ``width`` px of each mask's contour.

Thin structures (cable trenches) are nearly all boundary; region IoU forgives a contour that is off by a pixel
on a wide road but not on a trench, and boundary IoU shows it for every class. Written here because torchmetrics
has no boundary IoU; the bands come from max-pooling (a square structuring element), on the device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric


def boundary_band(masks: torch.Tensor, width: int) -> torch.Tensor:
    """(N, K, H, W) bool: pixels of each class mask within ``width`` px of its contour (inside the mask)."""
    shape = masks.float()
    eroded = -F.max_pool2d(-shape, 2 * width + 1, stride=1, padding=width)
    return (shape - eroded) > 0


class BoundaryIoU(Metric):
    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int, width: int = 2):
        super().__init__()
        self.num_classes, self.ignore_index, self.width = num_classes, ignore_index, width
        self.add_state("intersection", torch.zeros(num_classes, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("union", torch.zeros(num_classes, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        valid = (target != self.ignore_index).unsqueeze(1)
        classes = torch.arange(self.num_classes, device=target.device).view(1, -1, 1, 1)
        truth = (target.unsqueeze(1) == classes) & valid
        guess = (preds.unsqueeze(1) == classes) & valid
        truth_band, guess_band = boundary_band(truth, self.width) & valid, boundary_band(guess, self.width) & valid
        self.intersection += (truth_band & guess_band).sum(dim=(0, 2, 3)).double()
        self.union += (truth_band | guess_band).sum(dim=(0, 2, 3)).double()

    def compute(self) -> torch.Tensor:
        return torch.where(self.union > 0, self.intersection / self.union.clamp(min=1), torch.nan)
