"""Feature-space figures: the project's own encoder, Fréchet distance, diversity, memorisation.

No downloaded weights: the encoder is a small convolutional autoencoder trained here
on the real training slices (at 64², whatever the model's size), and its features are
the spatial mean of each encoder stage plus the spatial spread of the first, so they
see layout (deep stages) and texture, noise and blur (the first stage). The Fréchet
distance between feature Gaussians (Heusel et al. 2017) is only meaningful against
its floor: the same distance between two halves of the real held-out data, at the
same sample size.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from torch import nn

ENCODER_SIZE = 64
ENCODER_WIDTHS = (8, 16, 32, 32)
ENCODER_VERSION = "ae-1"


def to_encoder_size(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) slices → float32 tensor at 64² (area averaging when larger)."""
    t = torch.as_tensor(np.asarray(x, dtype=np.float32))
    if t.shape[-1] != ENCODER_SIZE:
        t = F.interpolate(
            t,
            size=(ENCODER_SIZE, ENCODER_SIZE),
            mode="area" if t.shape[-1] > ENCODER_SIZE else "bilinear",
            align_corners=None if t.shape[-1] > ENCODER_SIZE else False,
        )
    return t


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(8, cout), nn.SiLU())


class SliceEncoder(nn.Module):
    """Four conv stages (64², 32², 16², 8²) and a mirror decoder used only for training."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        w = ENCODER_WIDTHS
        self.stages = nn.ModuleList(
            [_block(channels, w[0], 1), _block(w[0], w[1], 2), _block(w[1], w[2], 2), _block(w[2], w[3], 2)]
        )
        self.decoder = nn.Sequential(
            nn.Upsample(scale_factor=2),
            _block(w[3], w[2], 1),
            nn.Upsample(scale_factor=2),
            _block(w[2], w[1], 1),
            nn.Upsample(scale_factor=2),
            _block(w[1], w[0], 1),
            nn.Conv2d(w[0], channels, 3, padding=1),
        )

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encode(x)[-1])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.encode(x)
        pooled = [m.mean(dim=(2, 3)) for m in maps]
        return torch.cat([*pooled, maps[0].std(dim=(2, 3))], dim=1)


def encoder_key(fingerprint: str, channels: int, steps: int, seed: int) -> str:
    text = json.dumps([ENCODER_VERSION, ENCODER_WIDTHS, fingerprint, channels, ENCODER_SIZE, steps, seed])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def one_cycle(opt: torch.optim.Optimizer, max_lr: float, steps: int) -> torch.optim.lr_scheduler.OneCycleLR:
    """One-cycle LR over `steps` steps; the warm-up takes at least two steps so short runs stay valid."""
    if steps < 3:
        raise ValueError(f"a training run needs at least 3 steps, got {steps}")
    return torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=max_lr, total_steps=steps, pct_start=min(0.5, max(0.1, 2 / steps))
    )


def train_encoder(
    train: np.ndarray, *, steps: int = 1500, batch: int = 32, seed: int = 0, progress: bool = False
) -> SliceEncoder:
    """Fit the autoencoder to real training slices (MSE reconstruction, random flips)."""
    torch.manual_seed(seed)
    x = to_encoder_size(train)
    net = SliceEncoder(x.shape[1])
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = one_cycle(opt, 2e-3, steps)
    g = torch.Generator().manual_seed(seed)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="encoder", unit="step", leave=False)
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        xb = x[idx]
        flip = torch.rand(batch, generator=g) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(-2), xb)
        loss = F.mse_loss(net(xb), xb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return net.eval()


def load_or_train_encoder(
    train: np.ndarray,
    fingerprint: str,
    cache_dir: Path | None,
    *,
    steps: int = 1500,
    seed: int = 0,
    progress: bool = False,
) -> SliceEncoder:
    """The encoder for this training reference, from `cache_dir` when it was trained before."""
    from safetensors.torch import load_file, save_file

    key = encoder_key(fingerprint, train.shape[1], steps, seed)
    path = cache_dir / f"encoder-{key}.safetensors" if cache_dir is not None else None
    if path is not None and path.is_file():
        net = SliceEncoder(train.shape[1])
        net.load_state_dict(load_file(str(path)))
        return net.eval()
    net = train_encoder(train, steps=steps, seed=seed, progress=progress)
    if path is not None:
        from synthmri.atomic import atomic_write

        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in net.state_dict().items()}
        atomic_write(path, lambda p: save_file(state, str(p)))
    return net


@torch.inference_mode()
def embed(encoder: SliceEncoder, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """(N, D) float64 features of (N, C, H, W) slices."""
    t = to_encoder_size(x)
    parts = [encoder.features(t[i : i + batch]) for i in range(0, t.shape[0], batch)]
    return torch.cat(parts).double().numpy() if parts else np.zeros((0, 0))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½) of two (N, D) feature sets."""
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b)
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2.0 * covmean))


def frechet_with_interval(
    a: np.ndarray, b: np.ndarray, *, boot: int = 100, seed: int = 0
) -> tuple[float, float, float]:
    """(FD, 2.5 %, 97.5 % bootstrap quantiles), resampling both sets with replacement."""
    fd = frechet_distance(a, b)
    rng = np.random.default_rng(seed)
    draws = [
        frechet_distance(a[rng.integers(0, len(a), len(a))], b[rng.integers(0, len(b), len(b))])
        for _ in range(boot)
    ]
    lo, hi = np.quantile(draws, [0.025, 0.975]) if draws else (fd, fd)
    return fd, float(lo), float(hi)


def mean_pairwise_distance(f: np.ndarray, scale: np.ndarray) -> float:
    """Mean Euclidean distance between distinct rows of f / scale (scale: the real features' spread)."""
    z = f / scale
    sq = (z**2).sum(axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * z @ z.T, 0.0)
    n = len(z)
    return float(np.sqrt(d2)[~np.eye(n, dtype=bool)].mean()) if n > 1 else float("nan")


def _pixels(x: np.ndarray) -> torch.Tensor:
    return to_encoder_size(x).flatten(1)


def nearest_distances(queries: np.ndarray, reference: np.ndarray, batch: int = 256) -> np.ndarray:
    """RMS pixel distance (model units, at 64²) from each query slice to its nearest reference slice.

    The reference is searched with its left-right mirror too: training used random flips.
    """
    ref = _pixels(np.concatenate([reference, reference[..., ::-1, :]]))
    ref_sq = (ref**2).sum(dim=1)
    out = []
    for i in range(0, len(queries), batch):
        q = _pixels(queries[i : i + batch])
        d2 = (q**2).sum(dim=1, keepdim=True) + ref_sq[None, :] - 2.0 * q @ ref.T
        out.append(d2.clamp(min=0).min(dim=1).values)
    dim = ref.shape[1]
    return torch.sqrt(torch.cat(out) / dim).double().numpy() if out else np.zeros(0)
