"""Train a diffusion model: one process, or DDP under torchrun.

    torchrun --nproc-per-node N -m training.train --preset P --data DIR --steps N --out DIR [--field V]
    synthmri train --preset P --data DIR --steps N --out DIR     # the same loop in one process

Reads top to bottom like nanoGPT's train.py: torchrun environment → one `is_master`
flag → DDP (NCCL on CUDA, gloo on CPU) → one loop. Each optimiser step consumes one
global batch, split evenly over the ranks and, on each rank, into micro-batches whose
gradients are accumulated locally and all-reduced once, on the last micro-step.

Every sample's timestep and noise come from its own generator seeded by (seed, its
position in the data stream), so a run's arithmetic does not depend on the world
size or the micro-batch size (up to summation order), and a resume only needs the
step to put the data stream, the noise and the LR back where they were.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

import synthmri
from model.checkpoint import save_checkpoint
from model.config import CheckpointConfig, ConfigError, Normalisation
from model.cpu_allocator import retain_freed_memory
from model.diffusion import GaussianDiffusion
from model.inference import resolved_precision_name
from model.seeding import sample_seed
from model.unet import UNetModel
from synthmri.atomic import atomic_write
from synthmri.channels import channels_of
from synthmri.cli import CliError, make_parser
from training.brats import DataError
from training.config import TrainConfig, add_config_arguments, config_from_args, from_dict
from training.ema import EMA
from training.metrics import MetricsLog
from training.schedule import get_lr

TRAIN_STATE = "train_state.pt"
TRAIN_CONFIG = "train_config.json"
VAL_SEED_OFFSET = 0x5EED  # validation noise stream, disjoint from the training one


# ---------------------------------------------------------------------------
# The data stream: a deterministic shuffle per epoch, one global batch per step.


class GlobalBatchSampler(Sampler[list[int]]):
    """This rank's share of each global batch, from `start_step` on, forever.

    The stream is the concatenation of per-epoch permutations seeded by (seed, epoch);
    step s takes stream positions [s·G, (s+1)·G) and rank r the r-th contiguous 1/world
    of them. So the samples of a step are the same for any world size, and the data
    position after s steps is just s·G (epoch = s·G // len, offset = s·G % len).
    """

    def __init__(self, n: int, global_batch: int, rank: int, world_size: int, seed: int, start_step: int):
        if n < 1:
            raise ConfigError("the training set is empty")
        self.n, self.global_batch, self.seed, self.start_step = n, global_batch, seed, start_step
        self.per_rank = global_batch // world_size
        self.rank = rank
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(
                sample_seed(self.seed, -1 - epoch)))}
        return self._perms[epoch]

    def positions(self, step: int) -> range:
        first = step * self.global_batch + self.rank * self.per_rank
        return range(first, first + self.per_rank)

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            yield [int(self._perm(p // self.n)[p % self.n]) for p in self.positions(step)]
            step += 1

    def position(self, step: int) -> dict[str, int]:
        p = step * self.global_batch
        return {"epoch": p // self.n, "offset": p % self.n, "position": p, "dataset_len": self.n}


def draw_t_noise(
    positions: range | list[int], shape: tuple[int, ...], num_timesteps: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform timesteps t ~ U{0..T-1} and ε ~ N(0, I), one generator per stream position."""
    ts, noise = [], []
    for p in positions:
        g = torch.Generator().manual_seed(sample_seed(seed, p))
        ts.append(torch.randint(0, num_timesteps, (1,), generator=g))
        noise.append(torch.randn(shape, generator=g))
    return torch.cat(ts), torch.stack(noise)


# ---------------------------------------------------------------------------
# One optimiser step's gradients: micro-batches, averaged.


def accumulate_gradients(
    model_fn: Callable[..., torch.Tensor],
    diffusion: Any,
    x_start: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    micro_batch: int,
    no_sync: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, torch.Tensor]:
    """Backward the mean hybrid loss over this rank's batch in micro-batches; return per-term sums.

    The gradient left in `.grad` equals that of one forward/backward over the whole batch:
    each micro-batch's mean loss is weighted by its share m/n of the batch. The reference
    implementation summed the micro-batch means instead, which multiplies the gradient by
    the number of micro-batches (a known bug: the effective LR then depends on the
    micro-batch size). DDP's all-reduce then averages over ranks, so the update follows
    the mean over the global batch. Gradient sync runs only on the last micro-step.
    """
    n = x_start.shape[0]
    sums = {k: torch.zeros((), device=x_start.device) for k in ("loss", "mse", "vb")}
    for start in range(0, n, micro_batch):
        stop = min(n, start + micro_batch)
        sync = stop == n
        with contextlib.nullcontext() if sync else no_sync():
            with autocast():
                losses = diffusion.training_losses(
                    model_fn, x_start[start:stop], t[start:stop], noise=noise[start:stop]
                )
            loss = losses["loss"].float().mean() * ((stop - start) / n)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        for k in sums:
            if k in losses:
                sums[k] += losses[k].detach().float().sum()
    return sums


# ---------------------------------------------------------------------------
# Helpers for the loop.


def resolve_precision(precision: str, device: torch.device) -> str:
    """The autocast precision, chosen as for sampling (`auto`: bf16 on GPUs that have it and on
    CPUs with bf16 dot products — 1.9× fp32 for the 121 M issue config on Zen 5 — else fp16 on
    older GPUs, fp32 on other CPUs)."""
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision fp16 needs CUDA (its GradScaler); use bf16 or fp32 on CPU")
    return resolved_precision_name(device, precision)


def resolve_channels_last(value: str | bool, precision: str) -> bool:
    """channels_last pays with reduced-precision convolutions (oneDNN, tensor cores), not in fp32 on CPU."""
    if value in ("auto", None):
        return precision in ("bf16", "fp16")
    return value in ("on", True)


def code_version() -> str:
    """synthmri version plus the git commit of the source tree when it is a checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        described = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        described = ""
    return f"{synthmri.__version__}+g{described}" if described else synthmri.__version__


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step where this torch build supports it."""
    try:
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def load_datasets(cfg: TrainConfig, is_master: bool, ddp: bool) -> tuple[Dataset[Any], Dataset[Any], str]:
    from training.dataset import SliceDataset, build_datasets, skip_report

    def build() -> tuple[SliceDataset, SliceDataset, str]:
        return build_datasets(
            cfg.data, cfg.channel_set, cfg.image_size, mode=cfg.mode, val_fraction=cfg.val_fraction,
            seed=cfg.seed, cache_dir=cfg.cache_dir or None,
            tumour_fraction=cfg.tumour_fraction if cfg.tumour_fraction >= 0 else None,
            hflip=cfg.hflip, slice_pattern=cfg.slice_pattern, skip_bad_subjects=cfg.skip_bad_subjects,
            progress=is_master and cfg.progress,
        )

    # The master fills the slice cache first so the ranks never race on writing it.
    if ddp and not is_master:
        dist.barrier()
    result = build()
    if ddp and is_master:
        dist.barrier()
    if is_master and result[0].cache.skipped:
        print(skip_report(result[0].cache.skipped), file=sys.stderr)
    return result


# ---------------------------------------------------------------------------


def train(
    cfg: TrainConfig,
    datasets: tuple[Dataset[Any], Dataset[Any], str] | None = None,
    extra_provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run (or resume) training as configured; returns a summary for the caller. See module doc.

    `datasets` = (train, val, fingerprint) replaces loading `cfg.data`; `extra_provenance`
    is merged into the checkpoint's provenance (e.g. how the demo's phantoms were made).
    """
    # -- torchrun environment → one is_master flag → device ------------------
    ddp = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank = int(os.environ.get("RANK", "0")) if ddp else 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if ddp else 0
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if ddp else 1
    is_master = rank == 0
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA device is available")
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if ddp and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    try:
        return _train(cfg, datasets, ddp, rank, world_size, is_master, device, extra_provenance or {})
    finally:
        if ddp and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, datasets: tuple[Dataset[Any], Dataset[Any], str] | None, ddp: bool, rank: int,
           world_size: int, is_master: bool, device: torch.device,
           extra_provenance: dict[str, Any]) -> dict[str, Any]:
    cfg.validate(world_size)
    precision = resolve_precision(cfg.precision, device)
    if device.type == "cpu":
        retain_freed_memory()
    if not (cfg.out or cfg.resume):
        raise ConfigError("--out is required")
    out = Path(cfg.out or cfg.resume)
    preset = cfg.model_preset
    per_rank = cfg.global_batch // world_size
    micro = min(cfg.micro_batch, per_rank)

    # -- data -----------------------------------------------------------------
    train_ds, val_ds, fingerprint = datasets if datasets is not None else load_datasets(cfg, is_master, ddp)
    n_train = len(train_ds)  # type: ignore[arg-type]

    # -- model, diffusion, EMA, optimiser (same init on every rank) ------------
    torch.manual_seed(cfg.seed)
    raw_model: nn.Module = UNetModel(preset.model).to(device)
    channels_last = resolve_channels_last(cfg.channels_last, precision)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    raw_model = raw_model.to(memory_format=memory_format)  # type: ignore[call-overload]
    diffusion = GaussianDiffusion.from_config(preset.diffusion)
    ema = EMA(raw_model, cfg.ema_decay, warmup=cfg.ema_warmup)
    optimizer = make_optimizer(list(raw_model.parameters()), cfg, device)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    start_step = 0
    resume_state: dict[str, Any] | None = None
    if cfg.resume:
        state_path = Path(cfg.resume) / TRAIN_STATE
        if not state_path.is_file():
            raise ConfigError(f"cannot resume: {state_path} does not exist")
        resume_state = torch.load(state_path, map_location="cpu", weights_only=False)
        raw_model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        ema.load_state_dict(resume_state["ema"])
        if scaler is not None and resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
        start_step = int(resume_state["step"])
        # Provenance given to the first run (e.g. how the demo's phantoms were made) outlives resumes.
        extra_provenance = {**resume_state.get("extra_provenance", {}), **extra_provenance}
        if is_master and resume_state.get("data_fingerprint") != fingerprint:
            print(f"warning: resuming on different data (fingerprint {fingerprint[:12]} vs "
                  f"{str(resume_state.get('data_fingerprint'))[:12]})", file=sys.stderr)
    model: nn.Module = raw_model
    if cfg.compile:
        model = torch.compile(model)  # type: ignore[assignment]
    if ddp:
        device_ids = [device.index] if _is_cuda(device) else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    # Per-rank streams for anything outside the per-sample noise (dropout, workers).
    torch.manual_seed(cfg.seed + 1 + rank)
    random.seed(cfg.seed + 1 + rank)
    np.random.seed((cfg.seed + 1 + rank) % 2**32)
    if resume_state is not None and len(resume_state.get("rng", [])) == world_size:
        set_rng_state(resume_state["rng"][rank])

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # Losses (the VB term especially) are computed in fp32 whatever the autocast dtype.
        return model(x.contiguous(memory_format=memory_format), t).float()

    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def autocast() -> contextlib.AbstractContextManager[Any]:
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=amp_dtype)

    def no_sync() -> contextlib.AbstractContextManager[Any]:
        return cast(nn.parallel.DistributedDataParallel, model).no_sync() if ddp else contextlib.nullcontext()

    sampler = GlobalBatchSampler(n_train, cfg.global_batch, rank, world_size, cfg.seed, start_step)
    loader = DataLoader(train_ds, batch_sampler=sampler, num_workers=cfg.num_workers,
                        pin_memory=_is_cuda(device), persistent_workers=cfg.num_workers > 0)
    sample_shape = (preset.model.in_channels, preset.model.image_size, preset.model.image_size)
    num_timesteps = int(diffusion.num_timesteps)

    # -- run directory, logs --------------------------------------------------
    metrics = MetricsLog(out / "metrics.jsonl")
    version = code_version() if is_master else ""
    if is_master:
        out.mkdir(parents=True, exist_ok=True)
        (out / TRAIN_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
        metrics.truncate_after(start_step)
        n_params = sum(p.numel() for p in raw_model.parameters())
        print(f"training {preset.name} ({cfg.channel_set}, {preset.model.image_size}², "
              f"{n_params / 1e6:.2f} M params) on {n_train} slices, world {world_size}, "
              f"global batch {cfg.global_batch} = "
              f"{world_size}×{per_rank} in micro-batches of {micro}, {precision}"
              f"{' channels_last' if channels_last else ''}, {device.type}, "
              f"steps {start_step}→{cfg.steps}", file=sys.stderr)

    @torch.no_grad()
    def validation_loss() -> float | None:
        """Hybrid loss of the EMA model on a fixed part of the validation set with fixed noise."""
        n_val = min(len(val_ds), cfg.val_batches * cfg.global_batch)  # type: ignore[arg-type]
        if n_val == 0:
            return None
        total = torch.zeros(2, device=device)
        for i in range(rank, n_val, world_size):
            x = torch.as_tensor(val_ds[i]).unsqueeze(0).to(device)
            t, noise = draw_t_noise([i], sample_shape, num_timesteps, cfg.seed + VAL_SEED_OFFSET)
            with autocast():
                losses = diffusion.training_losses(lambda a, b: ema.model(a, b).float(), x, t.to(device),
                                                   noise=noise.to(device))
            total += torch.stack([losses["loss"].float().sum(), torch.ones((), device=device)])
        if ddp:
            dist.all_reduce(total)
        return float(total[0] / total[1])

    quick_val = quick_validation_set(val_ds, cfg, device) if is_master and cfg.val_samples > 0 else None

    def checkpoint(step: int, last_loss: float | None, elapsed: float, final: bool) -> str | None:
        """Registry checkpoint (EMA) + train_state.pt + loss curve; sample grid when due."""
        rngs = [rng_state()]
        if ddp:
            rngs = [None] * world_size  # type: ignore[list-item]
            dist.all_gather_object(rngs, rng_state())
        val = validation_loss()
        sha = None
        if is_master:
            provenance = {
                "steps": step,
                "images_seen": step * cfg.global_batch,
                "data_fingerprint": fingerprint,
                "data_position": sampler.position(step),
                "code_version": version,
                "torch_version": torch.__version__,
                "world_size": world_size,
                "device": device.type,
                "precision": precision,
                "channels_last": channels_last,
                "train_seconds": round(elapsed, 1),
                "final_loss": last_loss,
                "val_loss": val,
                "recipe": recipe_provenance(cfg),
                "trained_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                **extra_provenance,
            }
            config = CheckpointConfig(
                name=out.resolve().name, channel_set=cfg.channel_set, model=preset.model,
                diffusion=preset.diffusion, normalisation=Normalisation(method=cfg.mode),
                provenance=provenance,
            )
            sha = save_checkpoint(out, {k: v.detach().cpu().contiguous() for k, v in
                                        ema.model.state_dict().items()}, config)
            state = {
                "step": step, "config": cfg.to_dict(), "model": raw_model.state_dict(),
                "optimizer": optimizer.state_dict(), "ema": ema.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rngs, "data_position": sampler.position(step), "data_fingerprint": fingerprint,
                "world_size": world_size, "extra_provenance": extra_provenance,
            }
            atomic_write(out / TRAIN_STATE, lambda path: torch.save(state, path))
            if val is not None:
                metrics.write({"kind": "val", "step": step, "val_loss": val})
            if quick_val is not None:
                from training.evaluation.quick import quick_record

                with autocast():
                    record = quick_record(lambda a, b: ema.model(a, b).float(), diffusion,
                                          channels_of(preset.channel_set), quick_val[0], quick_val[1],
                                          count=cfg.val_samples,
                                          sampler=cfg.sample_sampler, steps=cfg.sample_steps, seed=cfg.seed)
                metrics.write({"kind": "eval", "step": step, **record})
            from training.plots import write_loss_curve

            write_loss_curve(out / "metrics.jsonl", out / "loss_curve.png",
                             title=f"{out.name}: {preset.name}")
            due = final or (cfg.sample_every > 0 and step % cfg.sample_every == 0)
            if due and cfg.sample_count > 0:
                from training.plots import write_sample_grid

                write_sample_grid(out, out / "samples" / f"step{step:07d}.png", count=cfg.sample_count,
                                  sampler=cfg.sample_sampler, steps=cfg.sample_steps, seed=cfg.seed)
        if ddp:
            dist.barrier()
        return sha

    # -- the loop -------------------------------------------------------------
    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=start_step, disable=not (is_master and cfg.progress),
               dynamic_ncols=True, unit="step")
    batches = iter(loader)
    model.train()
    t_start = t_log = time.perf_counter()
    sums = torch.zeros(3, device=device)
    steps_in_log, last_loss, sha = 0, None, None
    step = start_step
    while step < cfg.steps:
        lr = get_lr(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x_start = next(batches).to(device, non_blocking=True).float()
        t, noise = draw_t_noise(sampler.positions(step), sample_shape, num_timesteps, cfg.seed)
        step_sums = accumulate_gradients(model_fn, diffusion, x_start, t.to(device), noise.to(device),
                                         micro, no_sync, autocast, scaler)
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or math.inf)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(raw_model)
        step += 1
        sums += torch.stack([step_sums["loss"], step_sums["mse"], step_sums["vb"]])
        steps_in_log += 1
        bar.update(1)

        out_of_time = cfg.max_minutes > 0 and time.perf_counter() - t_start > cfg.max_minutes * 60
        if ddp and cfg.max_minutes > 0:  # the ranks' clocks differ; all stop when the first runs out
            flag = torch.tensor(float(out_of_time), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            out_of_time = bool(flag.item())
        stopping = out_of_time or step == cfg.stop_at
        if step % cfg.log_every == 0 or step == cfg.steps or stopping:
            if ddp:
                dist.all_reduce(sums)
            now = time.perf_counter()
            mean = (sums / (steps_in_log * cfg.global_batch)).tolist()
            last_loss = mean[0]
            if not math.isfinite(last_loss) and scaler is None:
                raise FloatingPointError(
                    f"loss is {last_loss} at step {step}; lower --lr or use --precision fp32")
            record = {"kind": "train", "step": step, "loss": mean[0], "mse": mean[1], "vb": mean[2],
                      "lr": lr, "grad_norm": float(grad_norm),
                      "images_per_s": steps_in_log * cfg.global_batch / (now - t_log),
                      "elapsed_s": round(now - t_start, 2)}
            if is_master:
                metrics.write(record)
                bar.set_postfix(loss=f"{mean[0]:.4f}", lr=f"{lr:.2e}")
            sums.zero_()
            steps_in_log, t_log = 0, now
        if step % cfg.ckpt_every == 0 or step == cfg.steps or stopping:
            final = stopping or step == cfg.steps
            sha = checkpoint(step, last_loss, time.perf_counter() - t_start, final=final)
        if stopping:
            if is_master:
                why = f"time budget of {cfg.max_minutes} min used" if out_of_time else "--stop-at"
                print(f"stopping at step {step} ({why}); resume with --resume {out}", file=sys.stderr)
            break
    bar.close()
    if start_step >= cfg.steps and is_master:
        print(f"nothing to do: already at step {start_step} of {cfg.steps}", file=sys.stderr)
    return {"step": step, "sha256": sha, "out": str(out), "loss": last_loss,
            "seconds": time.perf_counter() - t_start}


def recipe_provenance(cfg: TrainConfig) -> dict[str, Any]:
    """The run's recipe for the checkpoint: every knob, the data folder by name, no machine paths."""
    recipe = {k: v for k, v in cfg.to_dict().items() if k not in ("resume", "out", "progress", "cache_dir")}
    recipe["data"] = Path(cfg.data).name if cfg.data else ""
    return recipe


def quick_validation_set(val_ds: Dataset[Any], cfg: TrainConfig, device: torch.device
                         ) -> tuple[torch.Tensor, dict[str, float]] | None:
    """(first validation slices for the x̂_0 error, the quick figures of up to 256 validation slices)."""
    from training.evaluation.quick import real_figures

    n = len(val_ds)  # type: ignore[arg-type]
    if n == 0:
        return None
    rows = np.linspace(0, n - 1, min(n, 256)).round().astype(int)
    x = torch.stack([torch.as_tensor(val_ds[int(i)]) for i in rows])
    channels = channels_of(cfg.channel_set)
    return x[:: max(1, len(rows) // 32)][:32].to(device), real_figures(x.numpy(), channels)


def _is_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def resumed_config(ns: Any, resume: str) -> TrainConfig:
    """The saved config of the run in `resume` with the flags given now applied. It writes back
    into `resume` unless --out is given: the saved `out` names where the run was first written,
    which for a copied or moved run directory is somewhere else."""
    saved = Path(resume) / TRAIN_CONFIG
    if not saved.is_file():
        raise CliError(f"cannot resume: {saved} does not exist")
    cfg = config_from_args(ns, base=from_dict(json.loads(saved.read_text())))
    return replace(cfg, resume=resume, out=getattr(ns, "out", None) or resume)


def main(argv: list[str] | None = None) -> int:
    """`synthmri train` / `python -m training.train` (also under torchrun)."""
    parser = make_parser("train", "Train a SynthMRI diffusion model (DDP when started by torchrun).")
    add_config_arguments(parser)
    ns = parser.parse_args(argv)
    try:
        resume = getattr(ns, "resume", "")
        cfg = resumed_config(ns, resume) if resume else config_from_args(ns)
        if not cfg.data:
            raise CliError("--data DIR is required (a BraTS folder or phantoms from `synthmri phantoms`)")
        if not cfg.out:
            raise CliError("--out DIR is required")
        summary = train(cfg)
    except (ConfigError, DataError, FileNotFoundError) as e:
        raise CliError(str(e)) from None
    if summary["sha256"]:
        print(f"checkpoint {summary['out']} (sha256 {summary['sha256'][:16]}…) at step {summary['step']}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CliError as err:
        print(f"synthmri train: error: {err}", file=sys.stderr)
        sys.exit(2)
