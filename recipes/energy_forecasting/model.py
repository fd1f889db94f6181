"""The forecasting network: a compact TiDE/N-HiTS-like MLP with quantile outputs (plain torch, exports to ONNX).

Why not a library model: pytorch-forecasting 1.8.0 (the newest; `pip install --dry-run`, 2026-11-30) requires
pandas<3.1 and would downgrade the pandas 3.1.1 every recipe shares, so it was not installed and its accuracy, speed
and ONNX export were not measured. This network is ~60 lines, takes two plain tensors and exports with the
standard exporter (parity checked in the tests).

- ``past`` (B, history, 2 + O + K + C): scaled target, present flag, observed covariates, known covariates, calendar.
- ``future`` (B, horizon, K + C): only what is known in advance. Observed-only covariates have no input here.
- The history is also seen at coarser rates (average pooling, as N-HiTS), an MLP encodes it with the future
  covariates (TiDE's dense encoder), and a per-step decoder maps each step's code and known covariates to the
  quantiles. A linear skip from the history carries the seasonal shape. Quantiles cannot cross: the median plus
  cumulative softplus offsets up and down.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class ResidualBlock(nn.Module):
    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Dropout(dropout), nn.Linear(width, width))
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.net(x))


class QuantileForecaster(nn.Module):
    def __init__(self, history: int, horizon: int, past_features: int, future_features: int, quantiles: list[float],
                 hidden: int = 128, layers: int = 2, dropout: float = 0.1, pool: list[int] = (1, 4, 24), code: int = 8):
        super().__init__()
        self.history, self.horizon, self.code = history, horizon, code
        self.pool = [p for p in pool if p <= history]
        self.median = list(quantiles).index(0.5)
        self.num_quantiles = len(quantiles)
        pooled = sum(history // p for p in self.pool if p > 1)
        inputs = history * past_features + pooled + horizon * future_features
        self.encoder = nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(),
                                     *[ResidualBlock(hidden, dropout) for _ in range(layers)])
        self.to_codes = nn.Linear(hidden, horizon * code)
        self.decoder = nn.Sequential(nn.Linear(code + future_features, hidden // 2), nn.ReLU(),
                                     nn.Linear(hidden // 2, self.num_quantiles))
        self.skip = nn.Linear(history, horizon)

    def forward(self, past: torch.Tensor, future: torch.Tensor) -> torch.Tensor:
        batch = past.shape[0]
        target = past[:, :, 0]
        views = [F.avg_pool1d(target.unsqueeze(1), p, p).flatten(1) for p in self.pool if p > 1]
        x = torch.cat([past.flatten(1), *views, future.flatten(1)], dim=1)
        codes = self.to_codes(self.encoder(x)).view(batch, self.horizon, self.code)
        raw = self.decoder(torch.cat([codes, future], dim=2))  # (B, horizon, Q)
        median = raw[:, :, self.median] + self.skip(target)
        below = torch.flip(torch.cumsum(F.softplus(torch.flip(raw[:, :, :self.median], [2])), 2), [2])
        above = torch.cumsum(F.softplus(raw[:, :, self.median + 1:]), 2)
        return torch.cat([median.unsqueeze(2) - below, median.unsqueeze(2), median.unsqueeze(2) + above], dim=2)


def pinball(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, quantiles: torch.Tensor) -> torch.Tensor:
    """Mean pinball (quantile) loss over the masked (B, horizon) points and the quantiles."""
    diff = target.unsqueeze(2) - pred
    loss = torch.maximum(quantiles * diff, (quantiles - 1) * diff).mean(2)
    return (loss * mask).sum() / mask.sum().clamp_min(1)
