"""Training figures: the loss curve and the sample grid written at checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes

from synthmri.atomic import atomic_write
from training.metrics import read_metrics


def write_loss_curve(metrics_path: str | Path, png_path: str | Path, title: str = "") -> None:
    """Training loss (and its running mean), validation loss and LR against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("loss") is not None and r.get("kind", "train") == "train"]
    val = [r for r in records if r.get("kind") == "val" and r.get("val_loss") is not None]
    quick = [r for r in records if r.get("kind") == "eval"]
    if not train:
        return
    steps = np.array([r["step"] for r in train])
    loss = np.array([r["loss"] for r in train], dtype=float)
    mse = np.array([r.get("mse", np.nan) for r in train], dtype=float)
    rows = 4 if quick else 2
    fig, axes = plt.subplots(rows, 1, figsize=(7, 5.5 + 4.0 * bool(quick)), sharex=True,
                             height_ratios=(3, 1, 2, 2)[:rows])
    ax, ax_lr = axes[0], axes[1]
    if quick:
        _quick_panels(quick, axes[2], axes[3])
    ax.plot(steps, loss, lw=0.8, alpha=0.4, label="loss (global batch)")
    window = max(1, len(loss) // 20)
    if window > 1:
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, lw=1.6, label=f"loss, mean of {window} logs")
    if np.isfinite(mse).any():
        ax.plot(steps, mse, lw=0.8, alpha=0.6, label="mse of the network's target (ε or v)")
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax.set_yscale("log")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(title or "training loss")
    ax_lr.plot(steps, [r.get("lr", np.nan) for r in train], color="tab:gray")
    ax_lr.set_ylabel("lr")
    axes[-1].set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(png_path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def _quick_panels(quick: list[dict[str, Any]], ax_x0: Axes, ax_fig: Axes) -> None:
    """The evaluation's quick figures per checkpoint: x̂_0 error at high noise, sample anatomy vs real."""
    steps = [r["step"] for r in quick]
    for key in quick[-1]["xstart_rmse"]:
        label = "mean slice" if key == "mean_slice" else f"x̂₀ at t = {key[1:]}"
        style: dict[str, Any] = {"color": "black", "ls": "--"} if key == "mean_slice" else {}
        ax_x0.plot(steps, [r["xstart_rmse"].get(key, np.nan) for r in quick], label=label, **style)
    ax_x0.set_ylabel("x̂₀ RMSE")
    ax_x0.legend(fontsize=7, ncol=3)
    ax_x0.grid(alpha=0.3)
    for key, colour in (("background_fraction", "tab:blue"), ("tumour_components", "tab:red"),
                        ("isolated_tumour_pixels", "tab:orange")):
        if key not in quick[-1]["samples"]:
            continue
        ax_fig.plot(steps, [r["samples"].get(key, np.nan) for r in quick], color=colour,
                    label=f"{key.replace('_', ' ')} (samples)")
        ax_fig.axhline(quick[-1]["real"][key], color=colour, ls=":", lw=1)
    ax_fig.set_yscale("symlog", linthresh=1.0)
    ax_fig.set_ylim(bottom=0)
    ax_fig.set_ylabel("sample figures\n(dotted: real)")
    ax_fig.legend(fontsize=7)
    ax_fig.grid(alpha=0.3)


def write_sample_grid(
    ckpt_dir: str | Path, png_path: str | Path, *, count: int, sampler: str, steps: int, seed: int = 0
) -> None:
    """Sample the checkpoint just written (EMA weights) and save rows=samples, columns=channels."""
    from model.checkpoint import load_checkpoint
    from model.generate import decode_sample, generate
    from synthmri.outputs.writers import write_grid

    ckpt = load_checkpoint(ckpt_dir)
    x = generate(ckpt, seed=seed, indices=range(count), sampler=sampler, steps=steps, batch_size=count)
    samples = [decode_sample(x[i], ckpt.config) for i in range(len(x))]
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    write_grid(png_path, samples, list(ckpt.config.channels))
