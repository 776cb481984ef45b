"""Learning-rate schedule as a pure function of the step (nanoGPT style)."""

from __future__ import annotations

import math

from training.config import TrainConfig


def get_lr(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up from lr/warmup to lr, then constant or cosine decay to min_lr at `cfg.steps`.

    `step` is the 0-based index of the optimiser step about to be taken.
    """
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.lr_schedule == "constant":
        return cfg.lr
    decay_steps = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / decay_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
