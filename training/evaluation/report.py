"""The evaluation's outputs: report.json, report.md, figures, and the model card (eval.json)."""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import synthmri
from model.config import CheckpointConfig
from synthmri.atomic import atomic_write
from synthmri.channels import SEG
from synthmri.modelcard import CARD_FILE, CARD_FORMAT_VERSION
from training.evaluation.morphology import BRAIN_THRESHOLD, decode

if TYPE_CHECKING:
    from training.evaluation.reference import ReferenceSlices
    from training.evaluation.run import EvalOptions, RealBaseline, SamplerResult

# (key, heading, format, what it is): the per-sampler table, in report order.
FIGURES: tuple[tuple[str, str, str, str], ...] = (
    ("background_fraction", "background", ".3f", "share of the slice outside the brain"),
    ("one_brain", "one brain", ".2f", "share of slices whose brain is one connected piece"),
    ("tumour_slices", "tumour slices", ".2f", "share of slices with any tumour"),
    ("tumour_components", "tumour pieces", ".2f", "connected tumour pieces per tumour slice"),
    ("isolated_tumour_pixels", "isolated px", ".2f", "tumour pixels with no tumour neighbour, per slice"),
    ("tumour_outside_brain", "outside brain", ".3f", "share of slices with tumour outside the brain"),
    ("clean_label_levels", "clean levels", ".3f", "share of mask pixels within 0.1 of a label level"),
    ("core_touches_healthy", "core→healthy", ".2f", "share of the tumour core's rim that is healthy tissue"),
    ("ncr_touches_healthy", "NCR→healthy", ".2f", "share of the necrosis rim that is healthy tissue"),
)


def summarise_downstream(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± sd over seeds per budget and arm, and the paired gain of adding synthetic slices."""
    out = []
    for budget in sorted({int(r["budget"]) for r in rows}):
        entry: dict[str, Any] = {"budget": budget}
        for arm in ("real", "real+synthetic"):
            picked = [r for r in rows if r["budget"] == budget and r["arm"] == arm]
            entry[arm] = {
                region: _mean_sd([float(r[region]) for r in picked]) for region in ("WT", "TC", "ET")
            }
        gains: dict[str, dict[str, float]] = {}
        for region in ("WT", "TC", "ET"):
            by_seed: dict[int, dict[str, float]] = {}
            for r in rows:
                if r["budget"] == budget:
                    by_seed.setdefault(r["seed"], {})[r["arm"]] = float(r[region])
            deltas = [100 * (v["real+synthetic"] - v["real"]) for v in by_seed.values() if len(v) == 2]
            gains[region] = _mean_sd(deltas)
        entry["gain_points"] = gains
        out.append(entry)
    return out


def _mean_sd(values: Sequence[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=float)
    return {
        "mean": float(a.mean()) if a.size else math.nan,
        "sd": float(a.std(ddof=1)) if a.size > 1 else 0.0,
        "n": float(a.size),
    }


def build_report(
    config: CheckpointConfig,
    sha256: str,
    ref: ReferenceSlices,
    base: RealBaseline,
    results: Sequence[SamplerResult],
    chosen: SamplerResult,
    study: dict[str, Any],
    opts: EvalOptions,
    seconds: float,
) -> dict[str, Any]:
    prov = config.provenance
    return {
        "model": {
            "name": config.name,
            "channel_set": config.channel_set,
            "image_size": config.image_size,
            "sha256": sha256,
            "steps": prov.get("steps"),
            "prediction": config.diffusion.prediction,
            "weighting": config.diffusion.weighting,
        },
        "data": {
            "split": ref.split,
            "train_slices": len(ref.train),
            "heldout_slices": len(ref.heldout),
            "train_subjects": ref.train_subjects,
            "heldout_subjects": ref.heldout_subjects,
        },
        "options": {
            "samples": opts.samples,
            "seed": opts.seed,
            "device": opts.device,
            "encoder_steps": opts.encoder_steps,
            "bootstrap": opts.boot,
        },
        "real": {
            "figures": base.figures,
            "frechet_floor": base.frechet_floor,
            "memorisation_median_nn": base.memorisation_median,
        },
        "samplers": [r.public() for r in results],
        "recommended": {
            "sampler": chosen.sampler,
            "steps": chosen.steps,
            "network_calls": chosen.network_calls,
        },
        "downstream": study,
        "software": synthmri.__version__,
        "evaluated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "seconds": round(seconds, 1),
    }


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)


def markdown(report: dict[str, Any]) -> str:
    """report.md: what was compared, the sampler table, intensities, memorisation, downstream Dice."""
    m, d, real = report["model"], report["data"], report["real"]
    opts, rec = report["options"], report["recommended"]
    floor = real["frechet_floor"]
    rows = report["samplers"]
    keys = [k for k in FIGURES if k[0] in real["figures"]]
    lines = [
        f"# Evaluation of `{m['name']}` ({m['channel_set']}, {m['image_size']}², step {m['steps']})",
        "",
        f"Checkpoint sha256 `{m['sha256'][:16]}…`; {m['prediction']}-prediction, {m['weighting']} weighting. "
        f"Real data: {d['split']}; {d['train_slices']} training and {d['heldout_slices']} held-out slices. "
        f"{opts['samples']} synthetic slices per sampler, request seed {opts['seed']}.",
        "",
        f"**Recommended sampler: {rec['sampler']} with {rec['steps']} steps** "
        f"({rec['network_calls']} network calls per sample): among the settings with clean masks "
        "(at most 0.3 isolated tumour pixels per slice or twice the real level, no tumour outside the "
        "brain beyond real data's), the fewest calls whose Fréchet distance is within 25 % of the best.",
        "",
        "## Samplers against real held-out slices",
        "",
        "| sampler | calls | s/sample | FD (95 % CI) | FD / floor | diversity | "
        + " | ".join(k[1] for k in keys)
        + " |",
        "|---|---|---|---|---|---|" + "---|" * len(keys),
        f"| real held-out | – | – | {floor['value']:.3f} ({floor['low']:.3f}–{floor['high']:.3f}) floor "
        "| 1.00 | 1.00 | "
        + " | ".join(_fmt(real["figures"].get(k[0]), k[2]) for k in keys)
        + " |",
    ]
    for r in rows:
        fd = r["frechet"]
        lines.append(
            f"| {r['label']} | {r['network_calls']} | {r['seconds_per_sample']:.3f} | "
            f"{fd['value']:.3f} ({fd['low']:.3f}–{fd['high']:.3f}) | {fd['ratio_to_floor']:.2f} | "
            f"{r['diversity']:.2f} | " + " | ".join(_fmt(r["figures"].get(k[0]), k[2]) for k in keys) + " |"
        )
    lines += [
        "",
        "Columns:",
        "",
        f"- FD: Fréchet distance of encoder features against one half of the held-out subjects; "
        f"the floor is the other half against it (n = {int(floor['n'])} per side, 95 % bootstrap interval). "
        "The encoder is a small autoencoder trained on the real training slices.",
        "- diversity: mean pairwise feature distance of the synthetic slices over that of real ones "
        "(1 = as varied as real data, below 1 = collapsing).",
    ]
    lines += [f"- {heading}: {what}" for _, heading, _, what in keys]
    lines += [
        f"- brain: any image channel above {BRAIN_THRESHOLD} (model range), holes filled.",
        "",
        "## Intensities inside the brain (1-Wasserstein to real, model units; 2 = full range)",
        "",
    ]
    first = rows[0]["intensity_w1"]
    classes = list(next(iter(first.values())).keys()) if first else []
    lines.append("| sampler | channel | " + " | ".join(classes) + " |")
    lines.append("|---|---|" + "---|" * len(classes))
    for r in rows:
        for channel, per in r["intensity_w1"].items():
            lines.append(
                f"| {r['label']} | {channel} | " + " | ".join(_fmt(per.get(c), ".3f") for c in classes) + " |"
            )
    lines += [
        "",
        "## Memorisation",
        "",
        f"Nearest training slice (RMS pixel distance, mirrored slices included): real held-out median "
        f"{real['memorisation_median_nn']:.3f}.",
        "",
        "| sampler | median NN | ratio to held-out | share closer than 95 % of held-out |",
        "|---|---|---|---|",
    ]
    for r in rows:
        mem = r["memorisation"]
        lines.append(
            f"| {r['label']} | {mem['median_nn']:.3f} | {mem['median_nn_ratio']:.2f} | "
            f"{mem['closer_than_heldout_p05']:.3f} |"
        )
    lines += [
        "",
        "A ratio well below 1, or a large share of samples closer to a training slice than "
        "almost all unseen real slices are, would mean the model copies its training data.",
        "",
    ]
    lines += _downstream_lines(report["downstream"])
    lines += [
        "",
        "## Figures",
        "",
        "![real vs synthetic](grid_recommended.png)",
        "",
        "![intensity histograms](histograms.png)",
        "",
        f"Software {report['software']}, evaluated {report['evaluated_at']} "
        f"in {report['seconds'] / 60:.1f} min.",
    ]
    return "\n".join(lines) + "\n"


def _downstream_lines(study: dict[str, Any]) -> list[str]:
    lines = ["## Downstream segmentation (Dice on held-out subjects)", ""]
    if "summary" not in study:
        return [*lines, f"Skipped: {study.get('skipped', 'not run')}."]
    seeds = int(max(e["real"]["WT"]["n"] for e in study["summary"]))
    lines += [
        f"A small 2D UNet segmenter trained {study['steps']} steps on K real slices, or on the same K "
        f"plus {study['synthetic']} synthetic slices ({study['sampler']}, half of each batch); "
        f"mean ± sd over {seeds} seeds; gain in Dice points, paired by seed.",
        "",
        "| K real | arm | WT | TC | ET |",
        "|---|---|---|---|---|",
    ]
    for e in study["summary"]:
        for arm in ("real", "real+synthetic"):
            cells = [
                f"{100 * e[arm][r]['mean']:.1f} ± {100 * e[arm][r]['sd']:.1f}" for r in ("WT", "TC", "ET")
            ]
            lines.append(f"| {e['budget']} | {arm} | " + " | ".join(cells) + " |")
        gains = [
            f"{e['gain_points'][r]['mean']:+.1f} ± {e['gain_points'][r]['sd']:.1f}"
            for r in ("WT", "TC", "ET")
        ]
        lines.append(f"| {e['budget']} | gain (points) | " + " | ".join(gains) + " |")
    return lines


def _grid_samples(x: np.ndarray, channels: Sequence[str]) -> list[dict[str, np.ndarray]]:
    from synthmri.channels import DEFAULT_LABEL_LEVELS, decode_labels

    out = []
    for s in x:
        sample: dict[str, np.ndarray] = {}
        for c, name in enumerate(channels):
            sample[name] = (
                decode_labels(s[c], DEFAULT_LABEL_LEVELS) if name == SEG else np.clip((s[c] + 1) / 2, 0, 1)
            )
        out.append(sample)
    return out


def side_by_side(
    real: np.ndarray, synthetic: np.ndarray, channels: Sequence[str], titles: Sequence[str], path: Path
) -> None:
    """Two grids (rows = slices, columns = channels) next to each other with a title above each."""
    from PIL import Image, ImageDraw, ImageFont

    from synthmri.outputs.writers import render_grid

    grids = [render_grid(_grid_samples(x, channels), channels)[0] for x in (real, synthetic)]
    top, gap = 30, 16
    try:
        font: ImageFont.ImageFont | ImageFont.FreeTypeFont = ImageFont.load_default(size=18)
    except TypeError:  # Pillow without FreeType
        font = ImageFont.load_default()
    width = sum(g.width for g in grids) + gap
    canvas = Image.new("RGB", (width, top + max(g.height for g in grids)), (20, 20, 24))
    draw = ImageDraw.Draw(canvas)
    x = 0
    for grid, title in zip(grids, titles, strict=True):
        canvas.paste(grid, (x, top))
        draw.text((x + 8, 6), title, fill=(235, 235, 235), font=font)
        x += grid.width + gap
    atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))


def histograms(
    real: np.ndarray, results: Sequence[SamplerResult], channels: Sequence[str], path: Path
) -> None:
    """Per image channel: intensity histogram inside the brain, real against each sampler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    real_d = decode(real, channels)
    names = real_d.image_channels
    fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names), 3.0), squeeze=False)
    bins = np.linspace(-1, 1, 61)
    for c, name in enumerate(names):
        ax = axes[0, c]
        ax.hist(
            real_d.images[:, c][real_d.brain],
            bins=bins,
            density=True,
            color="black",
            alpha=0.25,
            label="real held-out",
        )
        for r in results:
            d = decode(r.samples, channels)
            ax.hist(d.images[:, c][d.brain], bins=bins, density=True, histtype="step", lw=1.3, label=r.label)
        ax.set_title(f"{name} inside the brain")
        ax.set_xlabel("intensity (model range)")
        ax.set_yticks([])
    axes[0, -1].legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def write_report(
    out: Path,
    report: dict[str, Any],
    ref: ReferenceSlices,
    results: Sequence[SamplerResult],
    channels: Sequence[str],
    rows: int = 6,
) -> None:
    text = json.dumps(report, indent=2, sort_keys=False) + "\n"
    atomic_write(out / "report.json", lambda p: p.write_text(text))
    rng = np.random.default_rng(0)
    real = ref.heldout[np.sort(rng.choice(len(ref.heldout), min(rows, len(ref.heldout)), replace=False))]
    rec = report["recommended"]
    for r in results:
        name = (
            "grid_recommended.png"
            if (r.sampler, r.steps) == (rec["sampler"], rec["steps"])
            else f"grid_{r.sampler.replace('+', 'p')}_{r.steps}.png"
        )
        side_by_side(real, r.samples[:rows], channels, ("real held-out", f"synthetic: {r.label}"), out / name)
    histograms(ref.heldout, results, channels, out / "histograms.png")
    md = markdown(report)
    atomic_write(out / "report.md", lambda p: p.write_text(md))


def write_card(model_dir: Path, report: dict[str, Any]) -> None:
    """eval.json beside the checkpoint: the headline figures and the recommended sampler."""
    rec = report["recommended"]
    chosen = next(
        r for r in report["samplers"] if (r["sampler"], r["steps"]) == (rec["sampler"], rec["steps"])
    )
    card = {
        "format_version": CARD_FORMAT_VERSION,
        "checkpoint_sha256": report["model"]["sha256"],
        "recommended": rec,
        "headline": {
            "frechet_ratio_to_floor": chosen["frechet"]["ratio_to_floor"],
            **{k: chosen["figures"].get(k) for k, *_ in FIGURES if k in chosen["figures"]},
        },
        "real": {k: report["real"]["figures"].get(k) for k, *_ in FIGURES if k in report["real"]["figures"]},
        "samplers": [
            {
                "sampler": r["sampler"],
                "steps": r["steps"],
                "network_calls": r["network_calls"],
                "frechet_ratio_to_floor": r["frechet"]["ratio_to_floor"],
                "seconds_per_sample": r["seconds_per_sample"],
            }
            for r in report["samplers"]
        ],
        "downstream": report["downstream"].get("summary"),
        "data": report["data"]["split"],
        "evaluated_at": report["evaluated_at"],
        "software": report["software"],
    }
    text = json.dumps(card, indent=2) + "\n"
    atomic_write(model_dir / CARD_FILE, lambda p: p.write_text(text))
