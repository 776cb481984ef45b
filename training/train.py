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
from dataclasses import dataclass, replace
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
METRICS = "metrics.jsonl"
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


def autocast_precision(device: torch.device, precision: str) -> str:
    """The precision name training autocasts to, chosen as for sampling (`auto`: bf16 on GPUs
    that have it and on CPUs with bf16 dot products — 1.9× fp32 for the 121 M research 2-channel
    config on Zen 5 — else fp16 on older GPUs, fp32 on other CPUs)."""
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


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
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
# The run: what the loop, validation, checkpoints and sample figures share.


@dataclass(frozen=True)
class Ranks:
    """This process's place in the torchrun world, and its device."""

    ddp: bool
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.ddp:
            dist.barrier()


@dataclass
class Run:
    """The state of one training run (the same on every rank, bar `quick_val`)."""

    cfg: TrainConfig
    ranks: Ranks
    out: Path
    precision: str
    channels_last: bool
    raw_model: nn.Module  # the weights the optimiser updates
    model: nn.Module  # raw_model, compiled and/or DDP-wrapped: what the forward pass calls
    diffusion: GaussianDiffusion
    ema: EMA
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    sampler: GlobalBatchSampler
    val_ds: Dataset[Any]
    fingerprint: str
    extra_provenance: dict[str, Any]
    metrics: MetricsLog
    start_step: int = 0
    code_version: str = ""
    quick_val: tuple[torch.Tensor, dict[str, float]] | None = None

    @property
    def device(self) -> torch.device:
        return self.ranks.device

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        m = self.cfg.model_preset.model
        return m.in_channels, m.image_size, m.image_size

    @property
    def num_timesteps(self) -> int:
        return int(self.diffusion.num_timesteps)

    @property
    def micro_batch(self) -> int:
        return min(self.cfg.micro_batch, self.cfg.global_batch // self.ranks.world_size)

    def model_fn(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        # Losses (the VB term especially) are computed in fp32 whatever the autocast dtype.
        return self.model(x.contiguous(memory_format=memory_format), t).float()

    def ema_fn(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.ema.model(x, t).float()

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=amp_dtype)

    def no_sync(self) -> contextlib.AbstractContextManager[Any]:
        if not self.ranks.ddp:
            return contextlib.nullcontext()
        return cast(nn.parallel.DistributedDataParallel, self.model).no_sync()


def ranks_from_environment(cfg: TrainConfig) -> Ranks:
    """torchrun's RANK / LOCAL_RANK / WORLD_SIZE (one process without them) and the device."""
    ddp = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if ddp else 0
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA device is available")
    return Ranks(ddp=ddp, rank=int(os.environ.get("RANK", "0")) if ddp else 0,
                 world_size=int(os.environ.get("WORLD_SIZE", "1")) if ddp else 1,
                 device=torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"))  # fmt: skip


def start_run(cfg: TrainConfig, ranks: Ranks, datasets: tuple[Dataset[Any], Dataset[Any], str] | None,
              extra_provenance: dict[str, Any]) -> tuple[Run, DataLoader[Any]]:
    """Data, model, diffusion, EMA and optimiser (the same init on every rank), resumed when asked."""
    cfg.validate(ranks.world_size)
    precision = autocast_precision(ranks.device, cfg.precision)
    if ranks.device.type == "cpu":
        retain_freed_memory()
    if not (cfg.out or cfg.resume):
        raise ConfigError("--out is required")
    train_ds, val_ds, fingerprint = datasets or load_datasets(cfg, ranks.is_master, ranks.ddp)
    torch.manual_seed(cfg.seed)
    channels_last = resolve_channels_last(cfg.channels_last, precision)
    raw_model = UNetModel(cfg.model_preset.model).to(ranks.device)
    if channels_last:
        raw_model = raw_model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    sampler = GlobalBatchSampler(len(train_ds), cfg.global_batch, ranks.rank,  # type: ignore[arg-type]
                                 ranks.world_size, cfg.seed, start_step=0)  # fmt: skip
    out = Path(cfg.out or cfg.resume)
    run = Run(cfg=cfg, ranks=ranks, out=out, precision=precision, channels_last=channels_last,
              raw_model=raw_model, model=raw_model,
              diffusion=GaussianDiffusion.from_config(cfg.model_preset.diffusion),
              ema=EMA(raw_model, cfg.ema_decay, warmup=cfg.ema_warmup),
              optimizer=make_optimizer(list(raw_model.parameters()), cfg),
              scaler=torch.amp.GradScaler("cuda") if precision == "fp16" else None,
              sampler=sampler, val_ds=val_ds, fingerprint=fingerprint, extra_provenance=extra_provenance,
              metrics=MetricsLog(out / METRICS))  # fmt: skip
    saved = resume_run(run) if cfg.resume else None
    sampler.start_step = run.start_step
    if cfg.compile:
        run.model = torch.compile(run.model)  # type: ignore[assignment]
    if ranks.ddp:
        device_ids = [ranks.device.index] if ranks.device.type == "cuda" else None
        run.model = nn.parallel.DistributedDataParallel(run.model, device_ids=device_ids)
    # Per-rank streams for anything outside the per-sample noise (dropout, workers).
    torch.manual_seed(cfg.seed + 1 + ranks.rank)
    random.seed(cfg.seed + 1 + ranks.rank)
    np.random.seed((cfg.seed + 1 + ranks.rank) % 2**32)
    if saved is not None and len(saved.get("rng", [])) == ranks.world_size:
        set_rng_state(saved["rng"][ranks.rank])
    loader = DataLoader(train_ds, batch_sampler=sampler, num_workers=cfg.num_workers,
                        pin_memory=ranks.device.type == "cuda", persistent_workers=cfg.num_workers > 0)
    if ranks.is_master:
        open_run_directory(run, len(train_ds))  # type: ignore[arg-type]
        if cfg.val_samples > 0:
            run.quick_val = quick_validation_set(val_ds, cfg, ranks.device)
    return run, loader


def resume_run(run: Run) -> dict[str, Any]:
    """Load train_state.pt into the run (weights, optimiser, EMA, scaler, step); returns the state."""
    state_path = Path(run.cfg.resume) / TRAIN_STATE
    if not state_path.is_file():
        raise ConfigError(f"cannot resume: {state_path} does not exist")
    state = torch.load(state_path, map_location="cpu", weights_only=False)
    run.raw_model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.ema.load_state_dict(state["ema"])
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    run.start_step = int(state["step"])
    # Provenance given to the first run (e.g. how the demo's phantoms were made) outlives resumes.
    run.extra_provenance = {**state.get("extra_provenance", {}), **run.extra_provenance}
    if run.ranks.is_master and state.get("data_fingerprint") != run.fingerprint:
        print(f"warning: resuming on different data (fingerprint {run.fingerprint[:12]} vs "
              f"{str(state.get('data_fingerprint'))[:12]})", file=sys.stderr)
    return state


def open_run_directory(run: Run, n_train: int) -> None:
    """The master's share of starting: run directory, saved config, metrics log, banner."""
    cfg, ranks = run.cfg, run.ranks
    run.code_version = code_version()
    run.out.mkdir(parents=True, exist_ok=True)
    (run.out / TRAIN_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    run.metrics.truncate_after(run.start_step)
    n_params = sum(p.numel() for p in run.raw_model.parameters())
    m = cfg.model_preset.model
    print(f"training {cfg.model_preset.name} ({cfg.channel_set}, {m.image_size}², "
          f"{n_params / 1e6:.2f} M params) on {n_train} slices, world {ranks.world_size}, "
          f"global batch {cfg.global_batch} = {ranks.world_size}×{cfg.global_batch // ranks.world_size} "
          f"in micro-batches of {run.micro_batch}, {run.precision}"
          f"{' channels_last' if run.channels_last else ''}, {run.device.type}, "
          f"steps {run.start_step}→{cfg.steps}", file=sys.stderr)


# ---------------------------------------------------------------------------
# The loop.


def train(
    cfg: TrainConfig,
    datasets: tuple[Dataset[Any], Dataset[Any], str] | None = None,
    extra_provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run (or resume) training as configured; returns a summary for the caller. See module doc.

    `datasets` = (train, val, fingerprint) replaces loading `cfg.data`; `extra_provenance`
    is merged into the checkpoint's provenance (e.g. how the demo's phantoms were made).
    """
    ranks = ranks_from_environment(cfg)
    if ranks.device.type == "cuda":
        torch.cuda.set_device(ranks.device)
    if ranks.ddp and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if ranks.device.type == "cuda" else "gloo")
    try:
        run, loader = start_run(cfg, ranks, datasets, extra_provenance or {})
        return train_loop(run, loader)
    finally:
        if ranks.ddp and dist.is_initialized():
            dist.destroy_process_group()


def train_loop(run: Run, loader: DataLoader[Any]) -> dict[str, Any]:
    """One optimiser step per global batch; log, checkpoint and stop when due."""
    from tqdm import tqdm

    cfg, device = run.cfg, run.device
    bar = tqdm(total=cfg.steps, initial=run.start_step, disable=not (run.ranks.is_master and cfg.progress),
               dynamic_ncols=True, unit="step")
    batches = iter(loader)
    run.model.train()
    window = LossWindow(device)
    step, sha = run.start_step, None
    while step < cfg.steps:
        lr = get_lr(step, cfg)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        x_start = next(batches).to(device, non_blocking=True).float()
        t, noise = draw_t_noise(run.sampler.positions(step), run.sample_shape, run.num_timesteps, cfg.seed)
        losses = accumulate_gradients(run.model_fn, run.diffusion, x_start, t.to(device), noise.to(device),
                                      run.micro_batch, run.no_sync, run.autocast, run.scaler)
        grad_norm = optimizer_step(run)
        step += 1
        window.add(losses)
        bar.update(1)
        out_of_time = out_of_time_on_any_rank(run, window.started)
        stopping = out_of_time or step == cfg.stop_at
        if step % cfg.log_every == 0 or step == cfg.steps or stopping:
            log_training(run, window, step, lr, grad_norm, bar)
        if step % cfg.ckpt_every == 0 or step == cfg.steps or stopping:
            final = stopping or step == cfg.steps
            sha = checkpoint(run, step, window.last_loss, window.elapsed(), final=final)
        if stopping:
            if run.ranks.is_master:
                why = f"time budget of {cfg.max_minutes} min used" if out_of_time else "--stop-at"
                print(f"stopping at step {step} ({why}); resume with --resume {run.out}", file=sys.stderr)
            break
    bar.close()
    if run.start_step >= cfg.steps and run.ranks.is_master:
        print(f"nothing to do: already at step {run.start_step} of {cfg.steps}", file=sys.stderr)
    return {"step": step, "sha256": sha, "out": str(run.out), "loss": window.last_loss,
            "seconds": window.elapsed()}


def optimizer_step(run: Run) -> torch.Tensor:
    """Clip, step (through the GradScaler under fp16), clear the gradients, update the EMA;
    returns the gradient norm before clipping."""
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    grad_norm = nn.utils.clip_grad_norm_(run.raw_model.parameters(), run.cfg.grad_clip or math.inf)
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.ema.update(run.raw_model)
    return grad_norm


def out_of_time_on_any_rank(run: Run, started: float) -> bool:
    """--max-minutes: the ranks' clocks differ, so all stop when the first runs out."""
    minutes = run.cfg.max_minutes
    out_of_time = minutes > 0 and time.perf_counter() - started > minutes * 60
    if run.ranks.ddp and minutes > 0:
        flag = torch.tensor(float(out_of_time), device=run.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        out_of_time = bool(flag.item())
    return out_of_time


class LossWindow:
    """Loss sums over the steps since the last log record, and the run's clock."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(3, device=device)  # loss, mse, vb
        self.steps = 0
        self.started = self.since = time.perf_counter()
        self.last_loss: float | None = None

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        self.sums += torch.stack([losses["loss"], losses["mse"], losses["vb"]])
        self.steps += 1

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def log_training(run: Run, window: LossWindow, step: int, lr: float, grad_norm: torch.Tensor,
                 bar: Any) -> None:
    """Mean losses over the global batches since the last record → metrics.jsonl (master)."""
    cfg = run.cfg
    if run.ranks.ddp:
        dist.all_reduce(window.sums)
    now = time.perf_counter()
    mean = (window.sums / (window.steps * cfg.global_batch)).tolist()
    window.last_loss = mean[0]
    if not math.isfinite(mean[0]) and run.scaler is None:
        raise FloatingPointError(f"loss is {mean[0]} at step {step}; lower --lr or use --precision fp32")
    if run.ranks.is_master:
        run.metrics.write({"kind": "train", "step": step, "loss": mean[0], "mse": mean[1], "vb": mean[2],
                           "lr": lr, "grad_norm": float(grad_norm),
                           "images_per_s": window.steps * cfg.global_batch / (now - window.since),
                           "elapsed_s": round(now - window.started, 2)})  # fmt: skip
        bar.set_postfix(loss=f"{mean[0]:.4f}", lr=f"{lr:.2e}")
    window.sums.zero_()
    window.steps, window.since = 0, now


# ---------------------------------------------------------------------------
# Validation, checkpoints and sample figures.


@torch.no_grad()
def validation_loss(run: Run) -> float | None:
    """Hybrid loss of the EMA model on a fixed part of the validation set with fixed noise."""
    cfg, device, ranks = run.cfg, run.device, run.ranks
    n_val = min(len(run.val_ds), cfg.val_batches * cfg.global_batch)  # type: ignore[arg-type]
    if n_val == 0:
        return None
    total = torch.zeros(2, device=device)
    for i in range(ranks.rank, n_val, ranks.world_size):
        x = torch.as_tensor(run.val_ds[i]).unsqueeze(0).to(device)
        t, noise = draw_t_noise([i], run.sample_shape, run.num_timesteps, cfg.seed + VAL_SEED_OFFSET)
        with run.autocast():
            losses = run.diffusion.training_losses(run.ema_fn, x, t.to(device), noise=noise.to(device))
        total += torch.stack([losses["loss"].float().sum(), torch.ones((), device=device)])
    if ranks.ddp:
        dist.all_reduce(total)
    return float(total[0] / total[1])


def checkpoint(run: Run, step: int, last_loss: float | None, elapsed: float, final: bool) -> str | None:
    """Every rank: RNG states and validation loss. Master: registry checkpoint (EMA), train_state.pt,
    validation and quick-figure records, loss curve, and the sample grid when due. Returns the sha256."""
    rngs = [rng_state()]
    if run.ranks.ddp:
        rngs = [None] * run.ranks.world_size  # type: ignore[list-item]
        dist.all_gather_object(rngs, rng_state())
    val = validation_loss(run)
    sha = None
    if run.ranks.is_master:
        sha = save_registry_checkpoint(run, step, last_loss, elapsed, val)
        save_train_state(run, step, rngs)
        write_figures(run, step, val, final)
    run.ranks.barrier()
    return sha


def save_registry_checkpoint(run: Run, step: int, last_loss: float | None, elapsed: float,
                             val: float | None) -> str:
    """The EMA weights and their config + provenance, as the registry and the worker load them."""
    cfg = run.cfg
    provenance = {
        "steps": step,
        "images_seen": step * cfg.global_batch,
        "data_fingerprint": run.fingerprint,
        "data_position": run.sampler.position(step),
        "code_version": run.code_version,
        "torch_version": torch.__version__,
        "world_size": run.ranks.world_size,
        "device": run.device.type,
        "precision": run.precision,
        "channels_last": run.channels_last,
        "train_seconds": round(elapsed, 1),
        "final_loss": last_loss,
        "val_loss": val,
        "recipe": recipe_provenance(cfg),
        "trained_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **run.extra_provenance,
    }
    config = CheckpointConfig(
        name=run.out.resolve().name, channel_set=cfg.channel_set, model=cfg.model_preset.model,
        diffusion=cfg.model_preset.diffusion, normalisation=Normalisation(method=cfg.mode),
        provenance=provenance,
    )
    weights = {k: v.detach().cpu().contiguous() for k, v in run.ema.model.state_dict().items()}
    return save_checkpoint(run.out, weights, config)


def save_train_state(run: Run, step: int, rngs: list[dict[str, Any]]) -> None:
    """train_state.pt: what a resume needs to continue bit-identically (RNG states of every rank)."""
    state = {
        "step": step, "config": run.cfg.to_dict(), "model": run.raw_model.state_dict(),
        "optimizer": run.optimizer.state_dict(), "ema": run.ema.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "rng": rngs, "data_position": run.sampler.position(step), "data_fingerprint": run.fingerprint,
        "world_size": run.ranks.world_size, "extra_provenance": run.extra_provenance,
    }
    atomic_write(run.out / TRAIN_STATE, lambda path: torch.save(state, path))


def write_figures(run: Run, step: int, val: float | None, final: bool) -> None:
    """Validation and quick-evaluation records, the loss curve, and the sample grid when due."""
    from training.plots import write_loss_curve, write_sample_grid

    cfg, out = run.cfg, run.out
    if val is not None:
        run.metrics.write({"kind": "val", "step": step, "val_loss": val})
    if run.quick_val is not None:
        run.metrics.write({"kind": "eval", "step": step, **quick_figures(run, *run.quick_val)})
    write_loss_curve(out / METRICS, out / "loss_curve.png", title=f"{out.name}: {cfg.model_preset.name}")
    due = final or (cfg.sample_every > 0 and step % cfg.sample_every == 0)
    if due and cfg.sample_count > 0:
        write_sample_grid(out, out / "samples" / f"step{step:07d}.png", count=cfg.sample_count,
                          sampler=cfg.sample_sampler, steps=cfg.sample_steps, seed=cfg.seed)


def quick_figures(run: Run, x_real: torch.Tensor, real: dict[str, float]) -> dict[str, Any]:
    """The evaluation's quick figures of the EMA model: x̂_0 error on real slices, sample anatomy."""
    from training.evaluation.quick import quick_record

    cfg = run.cfg
    channels = channels_of(cfg.model_preset.channel_set)
    with run.autocast():
        return quick_record(run.ema_fn, run.diffusion, channels, x_real, real, count=cfg.val_samples,
                            sampler=cfg.sample_sampler, steps=cfg.sample_steps, seed=cfg.seed)


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
