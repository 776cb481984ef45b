"""Draw docs/architecture.png, the README's architecture picture.

.venv/bin/python docs/architecture.py        # rewrites docs/architecture.png
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

OUT = Path(__file__).with_name("architecture.png")

# name → (x, y, width, height, title, detail lines, fill colour)
BOXES = {
    "client": (
        0.0,
        3.6,
        2.5,
        1.6,
        "client",
        ["web page at /", "curl · Python", "synthmri generate"],
        "#e8eefc",
    ),
    "api": (
        4.1,
        3.6,
        3.1,
        1.6,
        "api",
        ["FastAPI, no torch", "auth · validation", "job records · downloads"],
        "#dfe9ff",
    ),
    "redis": (8.8, 3.6, 2.4, 1.6, "Redis", ["Celery broker", "job records", "progress"], "#fde9e7"),
    "worker": (
        12.8,
        3.6,
        3.1,
        1.6,
        "worker × N",
        ["Celery + torch", "one process per GPU", "batched sampling"],
        "#e4f5ea",
    ),
    "results": (
        4.1,
        0.6,
        7.1,
        1.4,
        "result store (results volume)",
        ["{results_dir}/{job_id}/", "NIfTI · PNG · grid.png · manifest.json · archive.zip"],
        "#fff4d6",
    ),
    "models": (
        12.8,
        6.5,
        3.1,
        1.4,
        "model registry",
        ["models/<name>/", "safetensors + config.json"],
        "#f1e8fb",
    ),
    "train": (8.3, 6.5, 2.9, 1.4, "training", ["torchrun, DDP", "BraTS slices → checkpoint"], "#eceff3"),
}

# (from, to, label, from side, to side)
ARROWS = [
    ("client", "api", "HTTP\nBearer key", "right", "left"),
    ("api", "redis", "send_task\n(job id)", "right", "left"),
    ("redis", "worker", "sample_range\ntasks", "right", "left"),
    ("worker", "results", "writes files", "bottom", "right"),
    ("results", "api", "serves downloads", "top", "bottom"),
    ("models", "worker", "loads", "bottom", "top"),
    ("train", "models", "checkpoint", "right", "left"),
]


def anchor(name: str, side: str) -> tuple[float, float]:
    x, y, w, h = BOXES[name][:4]
    return {
        "left": (x, y + h / 2),
        "right": (x + w, y + h / 2),
        "top": (x + w / 2, y + h),
        "bottom": (x + w / 2, y),
    }[side]


def main() -> None:
    fig, ax = plt.subplots(figsize=(14, 7.6), dpi=110)
    ax.set_xlim(-0.2, 16.1)
    ax.set_ylim(0.3, 8.9)
    ax.axis("off")
    for x, y, w, h, title, lines, colour in BOXES.values():
        ax.add_patch(
            FancyBboxPatch(
                (x, y), w, h, boxstyle="round,pad=0.04,rounding_size=0.15", fc=colour, ec="#3b4a6b", lw=1.4
            )
        )
        ax.text(
            x + w / 2,
            y + h - 0.3,
            title,
            ha="center",
            va="center",
            fontsize=12,
            weight="bold",
            color="#1c2433",
        )
        for k, line in enumerate(lines):
            ax.text(
                x + w / 2,
                y + h - 0.68 - 0.3 * k,
                line,
                ha="center",
                va="center",
                fontsize=9.5,
                color="#3b4a6b",
            )
    for a, b, label, side_a, side_b in ARROWS:
        start, end = anchor(a, side_a), anchor(b, side_b)
        if (a, b) == ("results", "api"):
            start = end = (BOXES["api"][0] + BOXES["api"][2] / 2, 0.0)
            start, end = (start[0], anchor(a, side_a)[1]), (end[0], anchor(b, side_b)[1])
        ax.add_patch(
            FancyArrowPatch(
                start, end, arrowstyle="-|>", mutation_scale=16, lw=1.6, color="#3559d1", shrinkA=3, shrinkB=3
            )
        )
        mx, my = (start[0] + end[0]) / 2, (start[1] + end[1]) / 2
        vertical = abs(start[0] - end[0]) < abs(start[1] - end[1])
        ax.text(
            mx + (0.12 if vertical else 0),
            my + (0 if vertical else 0.12),
            label,
            ha="left" if vertical else "center",
            va="center" if vertical else "bottom",
            fontsize=9,
            color="#3559d1",
            style="italic",
        )
    ax.text(
        -0.1,
        8.6,
        "SynthMRI: request → queue → GPU workers → files",
        fontsize=15,
        weight="bold",
        color="#1c2433",
        va="center",
    )
    ax.text(
        -0.1,
        8.15,
        "`synthmri up` runs Redis, one worker and the API on localhost;\n"
        "docker-compose.yml runs them as containers on GPU hosts.",
        fontsize=10,
        color="#5f6b7f",
        va="top",
    )
    fig.savefig(OUT, bbox_inches="tight", facecolor="white")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
