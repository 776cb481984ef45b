"""Exponential moving average of the model weights (what checkpoints ship)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class EMA:
    """θ_ema ← d·θ_ema + (1−d)·θ, kept in float32 on the model's device.

    With `warmup` the decay is min(decay, (1+n)/(10+n)) after n updates, so a run of
    a few hundred steps is not dominated by its random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        ema_params: list[torch.Tensor] = list(self.model.parameters())
        params = [p.detach().float() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - d)
        # Buffers (none in the UNet today) follow the model exactly.
        for b_ema, b in zip(self.model.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.num_updates = int(state["num_updates"])
