"""Downstream utility: a small 2D tumour segmenter trained with and without synthetic slices.

The segmenter is a three-level UNet (16–32–64 channels) over the image channels, with
four output classes (background, NCR, ED, ET) and cross-entropy + soft Dice loss. It
is trained for a fixed number of steps on K real slices, or on the same K real slices
plus M synthetic image+mask slices (each batch half real, half synthetic), and scored
by Dice of the BraTS regions on held-out subjects: whole tumour (NCR ∪ ED ∪ ET), tumour
core (NCR ∪ ET) and enhancing tumour (ET), pooled over all held-out pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from synthmri.channels import BRATS_LABELS, SEG
from training.evaluation.features import ENCODER_SIZE, one_cycle, to_encoder_size

# Class index of each BraTS label (0, 1, 2, 4 → 0, 1, 2, 3) and the regions as class sets.
CLASS_OF_LABEL = {label: k for k, label in enumerate(BRATS_LABELS)}
REGIONS: dict[str, tuple[int, ...]] = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.GroupNorm(8, cout),
        nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.GroupNorm(8, cout),
        nn.SiLU(),
    )


class SegNet(nn.Module):
    """Three-level UNet, 16–32–64 channels, 4 classes."""

    def __init__(self, channels: int, widths: Sequence[int] = (16, 32, 64)) -> None:
        super().__init__()
        a, b, c = widths
        self.enc1, self.enc2, self.mid = _conv(channels, a), _conv(a, b), _conv(b, c)
        self.up2, self.dec2 = nn.ConvTranspose2d(c, b, 2, stride=2), _conv(2 * b, b)
        self.up1, self.dec1 = nn.ConvTranspose2d(b, a, 2, stride=2), _conv(2 * a, a)
        self.head = nn.Conv2d(a, len(BRATS_LABELS), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.head(d1)


def split_images_labels(x: np.ndarray, channels: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Model-range slices with a seg channel → (images at 64², class indices at 64²)."""
    from synthmri.channels import decode_labels

    if SEG not in channels:
        raise ValueError("the segmenter needs slices with a seg channel")
    k = list(channels).index(SEG)
    image_idx = [i for i in range(len(channels)) if i != k]
    images = to_encoder_size(np.ascontiguousarray(x[:, image_idx]))
    labels = decode_labels(x[:, k])
    classes = np.zeros(labels.shape, dtype=np.int64)
    for label, cls in CLASS_OF_LABEL.items():
        classes[labels == label] = cls
    y = torch.from_numpy(classes)
    if y.shape[-1] != ENCODER_SIZE:
        y = F.interpolate(y[:, None].float(), size=(ENCODER_SIZE, ENCODER_SIZE), mode="nearest")[:, 0].long()
    return images, y


def _soft_dice_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    p = logits.softmax(dim=1)[:, 1:]
    onehot = F.one_hot(y, len(BRATS_LABELS)).permute(0, 3, 1, 2).float()[:, 1:]
    inter = (p * onehot).sum(dim=(0, 2, 3))
    denom = p.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    return 1.0 - ((2 * inter + 1.0) / (denom + 1.0)).mean()


def train_segmenter(
    real: tuple[torch.Tensor, torch.Tensor],
    synthetic: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    steps: int = 600,
    batch: int = 16,
    seed: int = 0,
) -> SegNet:
    """Train on `real` (images, classes); with `synthetic`, each batch is half synthetic."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = SegNet(real[0].shape[1])
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = one_cycle(opt, 3e-3, steps)
    n_syn = batch // 2 if synthetic is not None else 0
    net.train()
    for _ in range(steps):
        i = torch.randint(0, real[0].shape[0], (batch - n_syn,), generator=g)
        xb, yb = real[0][i], real[1][i]
        if synthetic is not None:
            j = torch.randint(0, synthetic[0].shape[0], (n_syn,), generator=g)
            xb, yb = torch.cat([xb, synthetic[0][j]]), torch.cat([yb, synthetic[1][j]])
        flip = torch.rand(xb.shape[0], generator=g) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(-2), xb)
        yb = torch.where(flip[:, None, None], yb.flip(-2), yb)
        logits = net(xb)
        loss = F.cross_entropy(logits, yb) + _soft_dice_loss(logits, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


@torch.inference_mode()
def predict(net: SegNet, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([net(images[i : i + batch]).argmax(dim=1) for i in range(0, images.shape[0], batch)])


def dice_scores(pred: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """Dice of WT, TC and ET pooled over every pixel of every slice (1.0 when both are empty)."""
    out = {}
    for region, classes in REGIONS.items():
        p = torch.isin(pred, torch.tensor(classes))
        t = torch.isin(truth, torch.tensor(classes))
        denom = int(p.sum() + t.sum())
        out[region] = 1.0 if denom == 0 else 2.0 * int((p & t).sum()) / denom
    return out


def downstream(
    train_real: tuple[torch.Tensor, torch.Tensor],
    synthetic: tuple[torch.Tensor, torch.Tensor],
    heldout: tuple[torch.Tensor, torch.Tensor],
    *,
    budgets: Sequence[int],
    seeds: Sequence[int],
    steps: int = 600,
) -> list[dict[str, object]]:
    """Per budget K and seed: Dice with K real slices, and with K real + all synthetic ones.

    The K slices are drawn per seed from `train_real`, so the spread over seeds covers
    both the choice of slices and the segmenter's initialisation.
    """
    rows: list[dict[str, object]] = []
    n = train_real[0].shape[0]
    for k in budgets:
        for seed in seeds:
            pick = torch.from_numpy(np.random.default_rng([seed, k]).choice(n, min(k, n), replace=False))
            real = (train_real[0][pick], train_real[1][pick])
            for arm, extra in (("real", None), ("real+synthetic", synthetic)):
                net = train_segmenter(real, extra, steps=steps, seed=seed)
                scores = dice_scores(predict(net, heldout[0]), heldout[1])
                rows.append({"budget": int(min(k, n)), "seed": int(seed), "arm": arm, **scores})
    return rows
