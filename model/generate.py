"""Deterministic batched sampling: the one entry point the CLI and the worker share.

Determinism contract: sample `i` of a request with seed `s` takes its x_T and every
stochastic step's noise from its own generator seeded by `(s, i)` (model.seeding), so
it does not depend on the count, the batch size or its batch neighbours.

Known channels (a given mask, a given T1CE slice) travel as one more per-row input: each
row keeps its own known values, and the model function of every batch is wrapped in
`model.conditioning.KnownChannels`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from model.conditioning import KnownChannels
from model.config import CheckpointConfig
from model.seeding import PerSampleNoise
from synthmri.channels import SEG, decode_labels

if TYPE_CHECKING:
    from model.checkpoint import LoadedCheckpoint

ProgressFn = Callable[[int, int], None]
StopFn = Callable[[], bool]


def resolve_steps(sampler: str, steps: int | None) -> int:
    """The sampler's step count: the request's, or the sampler's default."""
    from model.samplers import DEFAULT_STEPS, SAMPLERS

    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}")
    if steps is None:
        return int(DEFAULT_STEPS[sampler])
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    return int(steps)


def batches(indices: Sequence[int], batch_size: int) -> list[list[int]]:
    """Split sample indices, in order, into consecutive batches of at most `batch_size`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    idx = [int(i) for i in indices]
    return [idx[k : k + batch_size] for k in range(0, len(idx), batch_size)]


class BatchLimit:
    """The largest sampling batch known to fit in device memory, learned from out-of-memory errors.

    Starts unbounded; each out-of-memory halves the batch that failed and caps later batches at
    the half that then fits. One per (model, device) in a worker process (worker.model_cache).
    """

    def __init__(self, cap: int | None = None) -> None:
        self.cap = cap

    def clamp(self, batch_size: int) -> int:
        return batch_size if self.cap is None else max(1, min(batch_size, self.cap))

    def shrink(self, failed: int) -> int:
        """Record that a batch of `failed` rows ran out of memory; returns the size to try next."""
        half = (failed + 1) // 2
        self.cap = half if self.cap is None else min(self.cap, half)
        return half


def is_out_of_memory(e: BaseException) -> bool:
    """A device out-of-memory error (CUDA's, or any backend's `torch.OutOfMemoryError`)."""
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(e, oom)


def _free_cached_memory(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _masked(model_fn: Callable[..., torch.Tensor], group: list[int],
            dropped: Callable[[], Collection[int]]) -> Callable[..., torch.Tensor]:
    """`model_fn` that runs the network only on the rows of `group` still wanted; the others get
    zeros (their samples are thrown away). Batch invariance keeps the wanted rows unchanged."""

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        gone = dropped()
        keep = [k for k, row in enumerate(group) if row not in gone]
        if len(keep) == len(group) or not keep:
            return model_fn(x, t)
        index = torch.tensor(keep, device=x.device)
        y = model_fn(x.index_select(0, index), t.index_select(0, index))
        out = y.new_zeros((x.shape[0], *y.shape[1:]))
        out.index_copy_(0, index.to(y.device), y)
        return out

    return fn


@torch.inference_mode()
def generate(
    ckpt: LoadedCheckpoint,
    *,
    seed: int,
    indices: Sequence[int],
    sampler: str,
    steps: int | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    precision: str = "auto",
    limit: BatchLimit | None = None,
    known: np.ndarray | None = None,
    given: Sequence[str] = (),
    guidance: float = 0.0,
) -> np.ndarray:
    """Sample `indices` of request `seed`; returns (N, C, H, W) float32 in [-1, 1].

    Progress is reported as (steps done, total steps) summed over all batches;
    `should_stop` is passed to the sampler, which raises `SamplingCancelled`. With `given`
    channels, row k keeps `known[k]` in them (see `generate_rows`).
    """
    rows = [(seed, int(i)) for i in indices]
    return generate_rows(ckpt, rows, sampler=sampler, steps=steps, batch_size=batch_size, device=device,
                         progress=progress, should_stop=should_stop, precision=precision,
                         limit=limit, known=known, given=given, guidance=guidance)  # fmt: skip


@torch.inference_mode()
def generate_rows(
    ckpt: LoadedCheckpoint,
    rows: Sequence[tuple[int, int]],
    *,
    sampler: str,
    steps: int | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    precision: str = "auto",
    limit: BatchLimit | None = None,
    dropped: Callable[[], Collection[int]] | None = None,
    known: np.ndarray | None = None,
    given: Sequence[str] = (),
    guidance: float = 0.0,
) -> np.ndarray:
    """Sample rows given as (request seed, sample index), possibly of several requests; returns
    (N, C, H, W) float32 in [-1, 1], row k for `rows[k]`.

    Each row draws its noise from its own (seed, index) stream, so on a batch-invariant network
    a row comes out the same whatever the rows around it. A batch that runs out of device
    memory is split in halves and retried (fresh streams, so nothing changes), and `limit`
    remembers the size that fit. Progress is (sample-steps done, all sample-steps). `dropped()`
    names rows (positions in `rows`) no longer wanted: the network skips them, a batch of only
    such rows is abandoned, and their output rows are zeros.

    `given` names channels whose values are known: row k keeps `known[k]` ((N, C, H, W), model
    range; other channels ignored) in them and the rest is generated to match, with
    reconstruction guidance of weight `guidance` (which differentiates the network, so not int8).
    """
    from model.samplers import SAMPLERS, SamplingCancelled

    n_steps = resolve_steps(sampler, steps)
    limit = limit or BatchLimit()
    cfg = ckpt.config
    shape = (len(cfg.channels), cfg.image_size, cfg.image_size)
    mask = _known_mask(cfg, known, given, guidance, precision, len(rows))
    if not rows:
        return np.zeros((0, *shape), dtype=np.float32)
    model_fn = ckpt.model_fn(device, precision)
    sample_fn = SAMPLERS[sampler]
    out = np.zeros((len(rows), *shape), dtype=np.float32)
    total = n_steps * len(rows)
    finished = 0  # sample-steps of completed batches
    pending = batches(range(len(rows)), limit.clamp(batch_size))
    pending.reverse()
    while pending:
        group = pending.pop()
        if dropped is not None and set(group) <= set(dropped()):
            finished += n_steps * len(group)
            continue
        noise = PerSampleNoise.for_rows([rows[k] for k in group])
        batch_progress = None
        if progress is not None:

            def batch_progress(done: int, _total: int, base: int = finished, n: int = len(group)) -> None:
                progress(base + done * n, total)

        stop = should_stop
        fn = model_fn
        if dropped is not None:
            fn = _masked(model_fn, group, dropped)

            def stop(group: list[int] = group) -> bool:
                gone = dropped()
                return (should_stop is not None and should_stop()) or all(k in gone for k in group)

        if mask is not None and known is not None:
            # Outside the dropped-rows wrapper: KnownChannels sees the whole batch, dropped rows included.
            fn = KnownChannels(fn, ckpt.diffusion, torch.from_numpy(known[group]).to(device), mask, guidance)

        try:
            # x_T is the first draw from each sample's stream; step noise continues the same stream.
            x_T = noise.randn(shape, device=device)
            x_0 = sample_fn(fn, ckpt.diffusion, x_T, steps=n_steps, noise=noise.randn_like,
                            progress=batch_progress, should_stop=stop)  # fmt: skip
        except SamplingCancelled:
            if dropped is not None and set(group) <= set(dropped()) and not (should_stop and should_stop()):
                finished += n_steps * len(group)
                continue
            raise
        except Exception as e:
            if not is_out_of_memory(e) or len(group) == 1:
                raise
            del e
            _free_cached_memory(device)
            half = limit.shrink(len(group))
            pending += [group[half:], group[:half]]
            continue
        out[group] = x_0.detach().float().clamp(-1.0, 1.0).cpu().numpy()
        finished += n_steps * len(group)
    return out


def _known_mask(
    cfg: CheckpointConfig, known: np.ndarray | None, given: Sequence[str], guidance: float, precision: str,
    n: int,
) -> torch.Tensor | None:
    """The (C,) channel mask of the known channels, after checking the arguments that go with it."""
    if not given:
        return None
    unknown = [c for c in given if c not in cfg.channels]
    if unknown:
        raise ValueError(f"given channels {unknown} are not channels of the model {cfg.channels}")
    shape = (n, len(cfg.channels), cfg.image_size, cfg.image_size)
    if known is None or known.shape != shape:
        got = None if known is None else known.shape
        raise ValueError(f"known values must have shape {shape}, got {got}")
    if guidance > 0 and precision == "int8":
        raise ValueError("reconstruction guidance differentiates the network, and int8 has no gradients; "
                         "sample guided rows in a float precision (model.inference.differentiable_precision)")
    return torch.tensor([1.0 if c in given else 0.0 for c in cfg.channels])


def decode_sample(x: np.ndarray, config: CheckpointConfig) -> dict[str, np.ndarray]:
    """One (C, H, W) sample → {channel: image float32 in [0, 1] | seg uint8 BraTS labels}."""
    x = np.asarray(x, dtype=np.float32)
    channels = config.channels
    if x.ndim != 3 or x.shape[0] != len(channels):
        raise ValueError(f"expected a ({len(channels)}, H, W) sample for {channels}, got {x.shape}")
    levels: Mapping[int, float] = config.label_levels
    decoded: dict[str, np.ndarray] = {}
    for c, name in enumerate(channels):
        if name == SEG:
            decoded[name] = decode_labels(x[c], levels)
        else:
            decoded[name] = np.clip((x[c] + 1.0) / 2.0, 0.0, 1.0).astype(np.float32)
    return decoded
