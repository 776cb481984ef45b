"""The batch-invariant layers prepare_for_inference swaps in: same parameters, same key names, and
a plain UNet whose output does not depend on the caller's grad state."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from model.checkpoint import WEIGHTS_FILE, load_checkpoint
from model.config import PRESETS
from model.inference import prepare_for_inference
from model.inference_modules import BatchInvariantNormAct, PerSampleConv2d, RowwiseLinear
from model.unet import NormAct, UNetModel

pytestmark = pytest.mark.usefixtures("torch_single_thread")

DEMO = Path(__file__).resolve().parents[2] / "models" / "demo"


def _random_tiny() -> UNetModel:
    torch.manual_seed(0)
    net = UNetModel(PRESETS["tiny"].model)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(torch.randn_like(p) * 0.05)
    return net.eval()


def test_the_demo_checkpoint_loads_and_its_prepared_net_keeps_the_key_names() -> None:
    with safe_open(str(DEMO / WEIGHTS_FILE), framework="pt") as f:
        saved = set(f.keys())
    ckpt = load_checkpoint(DEMO)  # strict: every saved key names a parameter of the UNet
    assert set(ckpt.model.state_dict()) == saved
    prepared = prepare_for_inference(copy.deepcopy(ckpt.model), "cpu", precision="fp32").net
    assert set(prepared.state_dict()) == saved
    modules = list(prepared.modules())
    assert not any(type(m) is nn.Linear or type(m) is NormAct for m in modules)
    assert sum(isinstance(m, RowwiseLinear) for m in modules) > 2
    assert sum(isinstance(m, BatchInvariantNormAct) for m in modules) > 2
    assert isinstance(prepared.out_conv, PerSampleConv2d)  # type: ignore[union-attr]


def test_swapped_layers_share_the_parameters_and_compute_the_same() -> None:
    net = _random_tiny()
    prepared = prepare_for_inference(copy.deepcopy(net), "cpu", precision="fp32", micro_batch=0)
    x, t = torch.randn(3, 2, 32, 32), torch.tensor([4, 4, 900])
    with torch.inference_mode():
        ref = net(x, t)
    # The same network up to summation order (per-row matmuls, channels_last).
    assert (prepared(x, t) - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def test_rowwise_linear_gives_each_row_its_batch_of_one_result() -> None:
    torch.manual_seed(0)
    layer = RowwiseLinear.replacing(nn.Linear(64, 256))
    x = torch.randn(5, 64)
    x[3] = x[1]  # repeated rows (one timestep for the whole batch) are computed once
    with torch.inference_mode():
        batched = layer(x)
        alone = torch.cat([layer(x[i : i + 1]) for i in range(5)])
    assert torch.equal(batched, alone)


def test_the_plain_unet_does_not_depend_on_the_grad_state() -> None:
    net = _random_tiny()
    x, t = torch.randn(3, 2, 32, 32), torch.tensor([4, 4, 900])
    with_grad = net(x, t).detach()
    with torch.inference_mode():
        without = net(x, t)
    assert torch.equal(with_grad, without)
