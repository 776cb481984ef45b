from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from synthmri.contract import (
    DEFAULT_STEPS,
    SAMPLERS,
    JobRequest,
    JobSpec,
    JobState,
    nnunet_unfit,
    resolve_sampling,
)


def test_default_steps_agree_with_the_samplers() -> None:
    from model.samplers import DEFAULT_STEPS as MODEL_DEFAULTS
    from model.samplers import SAMPLERS as MODEL_SAMPLERS

    assert DEFAULT_STEPS == MODEL_DEFAULTS
    assert set(SAMPLERS) == set(MODEL_SAMPLERS)


def test_request_defaults_and_sampling_resolution() -> None:
    r = JobRequest(channels="t1ce+seg", count=2)
    assert (r.sampler, r.steps, r.seed, r.formats) == (None, None, None, ["nifti", "png"])
    assert resolve_sampling(None, None, None) == ("dpm++", 20)
    assert resolve_sampling("ddim", None, None) == ("ddim", 50)
    assert resolve_sampling("ddpm", 7, None) == ("ddpm", 7)
    # A model card's recommendation fills what the request leaves out, and only that.
    assert resolve_sampling(None, None, ("ddim", 30)) == ("ddim", 30)
    assert resolve_sampling(None, 12, ("ddim", 30)) == ("ddim", 12)
    assert resolve_sampling("ddim", None, ("ddim", 30)) == ("ddim", 30)
    assert resolve_sampling("ddpm", None, ("ddim", 30)) == ("ddpm", 1000)
    assert JobRequest(model="m", count=1, formats=["npz", "nifti", "npz"]).formats == ["nifti", "npz"]
    nnunet = ["nnunet", "nifti"]
    assert JobRequest(channels="t1ce+seg", count=1, formats=nnunet).formats == ["nifti", "nnunet"]
    assert JobRequest(channels="t1+t1ce+t2+flair+seg", count=1, formats=nnunet).formats == ["nifti", "nnunet"]


def test_nnunet_needs_seg_and_an_image_channel() -> None:
    assert nnunet_unfit(["t1ce", "seg"]) is None
    assert nnunet_unfit(["t1", "t1ce", "t2", "flair", "seg"]) is None
    assert "no seg channel (channels t1ce)" in str(nnunet_unfit(["t1ce"]))
    assert "no image channel (channels seg)" in str(nnunet_unfit(["seg"]))


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"count": 1}, "give `model`"),
        ({"channels": "t2+seg", "count": 1}, "unknown channel set 't2+seg'"),
        ({"channels": "t1ce", "count": 0}, "greater than or equal to 1"),
        ({"channels": "t1ce", "count": 1, "sampler": "euler"}, "sampler"),
        ({"channels": "t1ce", "count": 1, "extra": 1}, "extra"),
        ({"channels": "t1ce", "count": 1, "seed": 2**63}, "seed"),
        ({"channels": "t1ce+seg", "count": 1, "formats": ["png", "nnunet"]}, 'add "nifti" to formats'),
        ({"channels": "t1ce", "count": 1, "formats": ["nifti", "nnunet"]},
         "the nnunet format cannot be made: no seg channel (channels t1ce): an nnU-Net dataset needs labels; "
         "use t1ce+seg or t1+t1ce+t2+flair+seg"),
    ],
)
def test_request_rejects(body: dict[str, object], needle: str) -> None:
    with pytest.raises(ValidationError) as e:
        JobRequest.model_validate(body)
    assert needle in str(e.value)


def test_ranges_cover_the_count_contiguously() -> None:
    spec = JobSpec(
        id="0" * 16,
        owner="o",
        model="m",
        model_sha256="s",
        channel_set="t1ce",
        channels=["t1ce"],
        image_size=32,
        count=7,
        seed=1,
        sampler="ddim",
        steps=3,
        formats=["nifti"],
        batch_size=3,
        created_at=0.0,
        request={},
    )
    assert spec.ranges() == [(0, 3), (3, 6), (6, 7)]
    assert JobState.cancelled.terminal and not JobState.running.terminal


def test_api_imports_no_torch_model_or_worker() -> None:
    code = (
        "import sys, api.main, synthmri.client, synthmri.generate_cli; "
        "bad = [m for m in sys.modules if m == 'torch' or m.split('.')[0] in ('model', 'worker')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
