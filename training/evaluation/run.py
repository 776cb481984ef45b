"""`evaluate()`: a checkpoint's samples against real held-out slices, for several samplers.

For each sampler setting the same request (seed, sample indices) is generated and
measured: slice anatomy, masks, intensity distances, Fréchet distance with its
real-vs-real floor, diversity and memorisation. The downstream segmentation study uses
the samples of the recommended setting. Everything is deterministic in `seed`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model.checkpoint import LoadedCheckpoint, load_checkpoint
from synthmri.channels import SEG
from synthmri.modelcard import read_card, recommendation
from training.evaluation import features as feat
from training.evaluation.morphology import decode, intensity_distances, slice_figures
from training.evaluation.reference import ReferenceSlices, load_reference

FULL_SAMPLERS: tuple[tuple[str, int], ...] = (
    ("ddpm", 1000), ("ddpm", 250), ("ddim", 50), ("dpm++", 20), ("dpm++sde", 20)
)
QUICK_SAMPLERS: tuple[tuple[str, int], ...] = (("ddpm", 250), ("dpm++", 20), ("dpm++sde", 20))
# A setting is recommended when its Fréchet distance is within this factor of the table's best
# and its masks are as clean; among those, the one with the fewest network calls wins.
RECOMMEND_SLACK = 1.25
CLEAN_ISOLATED = 0.3  # isolated tumour pixels per slice a clean mask may have


@dataclass(frozen=True)
class EvalOptions:
    samples: int = 128  # synthetic slices per sampler setting
    samplers: tuple[tuple[str, int], ...] = FULL_SAMPLERS
    seed: int = 4711
    batch_size: int = 32
    device: str = "cpu"
    encoder_steps: int = 1500
    boot: int = 100
    # Real slices given to the downstream segmenter: a scarce and a larger budget (phantom
    # tumours are easy to see: 32 real slices already reach a Dice of ≈ 0.9).
    budgets: tuple[int, ...] = (8, 64)
    segmenter_seeds: tuple[int, ...] = (0, 1, 2)
    segmenter_steps: int = 600
    synthetic_for_segmenter: int = 256
    max_heldout: int = 1024
    progress: bool = False

    @classmethod
    def quick(cls, **kw: Any) -> EvalOptions:
        """Minutes on a CPU: fewer samples, two samplers, a short downstream study."""
        values: dict[str, Any] = dict(
            samples=64,
            samplers=QUICK_SAMPLERS,
            boot=50,
            encoder_steps=800,
            budgets=(8, 64),
            segmenter_seeds=(0, 1),
            segmenter_steps=300,
            synthetic_for_segmenter=64,
            max_heldout=512,
        )
        values.update(kw)
        return cls(**values)


@dataclass
class SamplerResult:
    sampler: str
    steps: int
    network_calls: int
    seconds_per_sample: float
    figures: dict[str, float]
    intensity_w1: dict[str, dict[str, float]]
    frechet: dict[str, float]
    diversity: float
    memorisation: dict[str, float]
    samples: np.ndarray = field(repr=False)

    @property
    def label(self) -> str:
        return f"{self.sampler} {self.steps}"

    def public(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("samples")
        d["label"] = self.label
        return d


def sample(
    ckpt: LoadedCheckpoint, sampler: str, steps: int, n: int, opts: EvalOptions, offset: int = 0
) -> tuple[np.ndarray, float]:
    """n samples (indices offset…offset+n of request `opts.seed`) and the seconds per sample."""
    from model.generate import generate

    bar = None
    if opts.progress:
        from tqdm import tqdm

        bar = tqdm(total=1, desc=f"{sampler} {steps}", unit="step", leave=False)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.n = done
            bar.refresh()

    t0 = time.perf_counter()
    x = generate(
        ckpt,
        seed=opts.seed,
        indices=range(offset, offset + n),
        sampler=sampler,
        steps=steps,
        batch_size=opts.batch_size,
        device=opts.device,
        progress=progress,
    )
    if bar is not None:
        bar.close()
    return x, (time.perf_counter() - t0) / max(n, 1)


@dataclass(frozen=True)
class RealBaseline:
    """What real held-out slices score on every figure, and the Fréchet floor."""

    figures: dict[str, float]
    frechet_floor: dict[str, float]
    diversity: float
    memorisation_median: float
    heldout_nn: np.ndarray
    half_a: np.ndarray  # held-out feature rows of the two subject halves
    half_b: np.ndarray
    scale: np.ndarray  # per-feature spread of the real held-out features


def subject_halves(subjects: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two halves of the held-out slices by subject (by slice when there is one subject)."""
    ids = np.unique(subjects)
    rng = np.random.default_rng(seed)
    if len(ids) >= 2:
        first = rng.permutation(ids)[: len(ids) // 2]
        in_a = np.isin(subjects, first)
    else:
        in_a = np.zeros(len(subjects), dtype=bool)
        in_a[rng.permutation(len(subjects))[: len(subjects) // 2]] = True
    return np.flatnonzero(in_a), np.flatnonzero(~in_a)


def real_baseline(
    ref: ReferenceSlices, channels: Sequence[str], encoder: feat.SliceEncoder, opts: EvalOptions
) -> RealBaseline:
    heldout_features = feat.embed(encoder, ref.heldout)
    a_idx, b_idx = subject_halves(ref.heldout_subject, opts.seed)
    half_a, half_b = heldout_features[a_idx], heldout_features[b_idx]
    n = min(len(half_a), len(half_b), opts.samples)
    fd, lo, hi = feat.frechet_with_interval(half_a[:n], half_b[:n], boot=opts.boot, seed=opts.seed)
    scale = heldout_features.std(axis=0) + 1e-8
    nn = feat.nearest_distances(ref.heldout, ref.train)
    return RealBaseline(
        figures=slice_figures(decode(ref.heldout, channels)),
        frechet_floor={"value": fd, "low": lo, "high": hi, "n": float(n)},
        diversity=feat.mean_pairwise_distance(heldout_features[: opts.samples * 2], scale),
        memorisation_median=float(np.median(nn)),
        heldout_nn=nn,
        half_a=half_a,
        half_b=half_b,
        scale=scale,
    )


def measure(
    x: np.ndarray,
    ref: ReferenceSlices,
    base: RealBaseline,
    channels: Sequence[str],
    encoder: feat.SliceEncoder,
    opts: EvalOptions,
) -> dict[str, Any]:
    """Every per-set figure of synthetic slices `x` against the real baseline."""
    syn_features = feat.embed(encoder, x)
    n = int(base.frechet_floor["n"])
    fd, lo, hi = feat.frechet_with_interval(syn_features[:n], base.half_b[:n], boot=opts.boot, seed=opts.seed)
    nn = feat.nearest_distances(x, ref.train)
    closer = float((nn < np.quantile(base.heldout_nn, 0.05)).mean())
    return {
        "figures": slice_figures(decode(x, channels)),
        "intensity_w1": intensity_distances(
            decode(x, channels), decode(ref.heldout, channels), seed=opts.seed
        ),
        "frechet": {
            "value": fd,
            "low": lo,
            "high": hi,
            "n": float(n),
            "ratio_to_floor": fd / max(base.frechet_floor["value"], 1e-12),
        },
        "diversity": feat.mean_pairwise_distance(syn_features, base.scale) / max(base.diversity, 1e-12),
        "memorisation": {
            "median_nn": float(np.median(nn)),
            "median_nn_ratio": float(np.median(nn)) / max(base.memorisation_median, 1e-12),
            "closer_than_heldout_p05": closer,
        },
    }


def clean_masks(figures: dict[str, float], real: dict[str, float]) -> bool:
    """Masks a segmentation team can train on: few isolated tumour pixels, no tumour outside the brain.

    Isolated pixels up to `CLEAN_ISOLATED` per slice or twice the real data's own level
    (downsampled real masks have a few); tumour outside the brain no more often than in
    real data plus 2 % of slices. Channel sets without a mask are always clean.
    """
    if "isolated_tumour_pixels" not in figures:
        return True
    isolated_ok = figures["isolated_tumour_pixels"] <= max(CLEAN_ISOLATED, 2 * real["isolated_tumour_pixels"])
    return isolated_ok and figures["tumour_outside_brain"] <= real["tumour_outside_brain"] + 0.02


def recommend(results: Sequence[SamplerResult], real: dict[str, float]) -> SamplerResult:
    """The cheapest setting whose Fréchet distance is within `RECOMMEND_SLACK` of the best.

    Settings with clean masks (`clean_masks`) are preferred: only when none has them is
    the choice made among all, so a fast sampler that gets the layout right but scatters
    the mask is not chosen over a slower one that does not.
    """
    clean = [r for r in results if clean_masks(r.figures, real)]
    pool = clean or list(results)
    best = min(r.frechet["value"] for r in pool)
    near = [r for r in pool if r.frechet["value"] <= RECOMMEND_SLACK * best]
    return min(near, key=lambda r: (r.network_calls, r.frechet["value"]))


def evaluate(
    model_dir: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    train_data: str | Path | None = None,
    options: EvalOptions | None = None,
    write_card: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Evaluate the checkpoint in `model_dir`; writes report.md, report.json and figures into `out`.

    With `write_card`, the model card (`eval.json`: headline figures and the recommended
    sampler) is written beside the checkpoint. Returns the report as a dict.
    """
    from training.evaluation import report as rep
    from training.evaluation.segmenter import downstream, split_images_labels

    opts = options or EvalOptions()
    t_start = time.perf_counter()

    def say(message: str) -> None:
        log(f"[{time.perf_counter() - t_start:5.0f} s] {message}")

    ckpt = load_checkpoint(model_dir, device=opts.device)
    cfg = ckpt.config
    channels = list(cfg.channels)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say(f"eval: loading real slices ({cfg.channel_set}, {cfg.image_size}²)")
    ref = load_reference(
        cfg, data, train_data, max_heldout=opts.max_heldout, seed=opts.seed, progress=opts.progress
    )
    say(f"eval: {ref.split}; {len(ref.train)} training and {len(ref.heldout)} held-out slices")
    cache_dir = Path(data) / ".synthmri-cache" / "eval"
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError:
        cache_dir = out / "cache"
    encoder = feat.load_or_train_encoder(
        ref.train,
        ref.fingerprint,
        cache_dir,
        steps=opts.encoder_steps,
        seed=opts.seed,
        progress=opts.progress,
    )
    say("eval: encoder ready")
    base = real_baseline(ref, channels, encoder, opts)
    say(
        f"eval: real-vs-real Fréchet floor {base.frechet_floor['value']:.3f} "
        f"(n = {int(base.frechet_floor['n'])} per side)"
    )

    settings = list(dict.fromkeys(opts.samplers))
    recommended = recommendation(read_card(model_dir, ckpt.sha256))
    if recommended is not None and recommended not in settings:
        settings.append(recommended)
    results = []
    for sampler, steps in settings:
        x, per_sample = sample(ckpt, sampler, steps, opts.samples, opts)
        m = measure(x, ref, base, channels, encoder, opts)
        results.append(
            SamplerResult(
                sampler,
                steps,
                steps,
                per_sample,
                m["figures"],
                m["intensity_w1"],
                m["frechet"],
                m["diversity"],
                m["memorisation"],
                x,
            )
        )
        say(
            f"eval: {sampler} {steps}: FD {m['frechet']['value']:.3f} "
            f"({m['frechet']['ratio_to_floor']:.2f}× floor), {per_sample:.3f} s/sample"
        )
    chosen = recommend(results, base.figures)

    study: dict[str, Any] = {"skipped": "the model generates no mask (no seg channel)"}
    if SEG in channels:
        say(f"eval: downstream segmentation with {chosen.label} samples")
        extra_n = max(0, opts.synthetic_for_segmenter - len(chosen.samples))
        syn = chosen.samples
        if extra_n:
            more, _ = sample(ckpt, chosen.sampler, chosen.steps, extra_n, opts, offset=len(chosen.samples))
            syn = np.concatenate([syn, more])
        syn = syn[: opts.synthetic_for_segmenter]
        rows = downstream(
            split_images_labels(ref.train, channels),
            split_images_labels(syn, channels),
            split_images_labels(ref.heldout, channels),
            budgets=opts.budgets,
            seeds=opts.segmenter_seeds,
            steps=opts.segmenter_steps,
        )
        study = {
            "synthetic": len(syn),
            "sampler": chosen.label,
            "steps": opts.segmenter_steps,
            "rows": rows,
            "summary": rep.summarise_downstream(rows),
        }

    report = rep.build_report(
        cfg, ckpt.sha256, ref, base, results, chosen, study, opts, seconds=time.perf_counter() - t_start
    )
    rep.write_report(out, report, ref, results, channels)
    if write_card:
        rep.write_card(Path(model_dir), report)
    say(f"eval: report in {out / 'report.md'}")
    return report
