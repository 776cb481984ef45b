"""DDP: two gloo processes on the CPU reach the weights of one process with the same global batch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from model.config import get_preset
from model.unet import UNetModel
from synthmri.localstack import free_port
from training.config import preset_config
from training.train import GlobalBatchSampler, train

STEPS = 3
# Same samples, timesteps and noise in both runs; only the order of the gradient
# summation differs (gloo all-reduce of two half-batch means vs one full-batch mean):
# measured max |Δw| ≈ 2e-7 after 3 steps in fp32, far below one Adam update (≈ lr = 1e-3).
TOLERANCE = 1e-5


def synthetic_slices(n: int = 24, seed: int = 0) -> list[torch.Tensor]:
    """Smooth random (2, 32, 32) images in [-1, 1]: a stand-in dataset held in memory."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 2, 4, 4, generator=g) * 2 - 1
    x = torch.nn.functional.interpolate(coarse, size=32, mode="bilinear", align_corners=False)
    return list(x)


def run_config(out: Path, micro_batch: int) -> object:
    return preset_config("tiny", out=str(out), steps=STEPS, global_batch=8, micro_batch=micro_batch,
                         ckpt_every=STEPS, sample_count=0, progress=False, val_batches=0, ema_decay=0.5,
                         ema_warmup=False, precision="fp32")


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    data = synthetic_slices()
    train(run_config(Path(out), micro_batch=2), (data, [], "synthetic"))  # type: ignore[arg-type]


def test_each_step_splits_one_global_batch_over_the_ranks() -> None:
    single = GlobalBatchSampler(20, 8, rank=0, world_size=1, seed=3, start_step=0)
    ranks = [GlobalBatchSampler(20, 8, rank=r, world_size=2, seed=3, start_step=0) for r in range(2)]
    it1, it2 = iter(single), [iter(s) for s in ranks]
    seen: list[int] = []
    for _ in range(5):  # 40 samples = two full epochs of 20
        whole = next(it1)
        assert whole == next(it2[0]) + next(it2[1])
        seen += whole
    assert sorted(seen[:20]) == list(range(20)) and sorted(seen[20:]) == list(range(20))
    assert seen[:20] != seen[20:], "each epoch must be reshuffled"
    resumed = GlobalBatchSampler(20, 8, rank=0, world_size=1, seed=3, start_step=3)
    assert next(iter(resumed)) == seen[24:32]
    assert resumed.position(3) == {"epoch": 1, "offset": 4, "position": 24, "dataset_len": 20}


@pytest.mark.timeout(600)
def test_two_gloo_ranks_match_one_process(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    mp.spawn(_worker, args=(2, free_port(), str(ddp_out)), nprocs=2, join=True)
    # One process, the whole global batch of 8 in a single micro-batch.
    train(run_config(single_out, micro_batch=8), (synthetic_slices(), [], "synthetic"))  # type: ignore[arg-type]

    ddp_state = torch.load(ddp_out / "train_state.pt", weights_only=False)
    single_state = torch.load(single_out / "train_state.pt", weights_only=False)
    assert ddp_state["step"] == single_state["step"] == STEPS
    assert ddp_state["world_size"] == 2 and len(ddp_state["rng"]) == 2
    for name, w in single_state["model"].items():
        diff = (ddp_state["model"][name] - w).abs().max().item()
        assert diff < TOLERANCE, f"{name}: DDP and single-process weights differ by {diff:.2e}"
    for name, w in single_state["ema"]["model"].items():
        assert (ddp_state["ema"]["model"][name] - w).abs().max().item() < TOLERANCE
    # The shipped weights are the EMA ones.
    shipped = load_file(str(ddp_out / "model.safetensors"))
    assert all(torch.equal(shipped[k], v) for k, v in ddp_state["ema"]["model"].items())
    # Not vacuous: training moved the weights from their seed-0 init by far more than the tolerance.
    torch.manual_seed(0)
    init = UNetModel(get_preset("tiny").model).state_dict()
    moved = max((single_state["model"][k] - v).abs().max().item() for k, v in init.items())
    assert moved > 100 * TOLERANCE
