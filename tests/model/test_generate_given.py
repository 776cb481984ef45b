"""generate() with known channels: every sampler returns them exactly, rows keep their own values,
and batching, dropped rows and out-of-memory splits change nothing (tiny checkpoint, t1ce+seg)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model.checkpoint import LoadedCheckpoint, load_checkpoint
from model.generate import BatchLimit, decode_sample, generate, generate_rows
from synthmri.channels import encode_labels
from tests.model.test_generate import raise_oom_above

pytestmark = pytest.mark.usefixtures("torch_single_thread")

STEPS = {"ddpm": 8, "ddim": 5, "dpm++": 5, "dpm++sde": 5}


@pytest.fixture(scope="module")
def ckpt(_tiny_checkpoint_master: Path) -> LoadedCheckpoint:
    return load_checkpoint(_tiny_checkpoint_master)


def masks(n: int, size: int = 32) -> np.ndarray:
    """(n, size, size) BraTS labels: a differently placed tumour (ED around NCR, an ET rim) per row."""
    out = np.zeros((n, size, size), dtype=np.uint8)
    for k in range(n):
        a, b = 6 + 3 * k, 8 + 2 * k
        out[k, a : a + 12, b : b + 12] = 2
        out[k, a + 3 : a + 9, b + 3 : b + 9] = 4
        out[k, a + 5 : a + 7, b + 5 : b + 7] = 1
    return out


def known_seg(labels: np.ndarray) -> np.ndarray:
    """(n, 2, H, W) known values: the seg channel encoded, the t1ce channel unused (zeros)."""
    known = np.zeros((len(labels), 2, *labels.shape[1:]), dtype=np.float32)
    known[:, 1] = encode_labels(labels)
    return known


@pytest.mark.parametrize("sampler", list(STEPS))
@pytest.mark.parametrize("guidance", [0.0, 16.0])
def test_a_given_seg_comes_back_exactly_with_every_sampler(
    ckpt: LoadedCheckpoint, sampler: str, guidance: float
) -> None:
    labels = masks(3)
    x = generate(ckpt, seed=3, indices=range(3), sampler=sampler, steps=STEPS[sampler], batch_size=3,
                 known=known_seg(labels), given=["seg"], guidance=guidance)  # fmt: skip
    assert np.abs(x[:, 1] - encode_labels(labels)).max() < 1e-5
    for k in range(3):
        np.testing.assert_array_equal(decode_sample(x[k], ckpt.config)["seg"], labels[k])
    free = generate(ckpt, seed=3, indices=range(3), sampler=sampler, steps=STEPS[sampler], batch_size=3)
    assert np.abs(x[:, 0] - free[:, 0]).max() > 1e-3  # the generated channel heard about the mask


def test_a_given_image_comes_back_within_float_tolerance(ckpt: LoadedCheckpoint) -> None:
    rng = np.random.default_rng(0)
    known = np.zeros((2, 2, 32, 32), dtype=np.float32)
    known[:, 0] = rng.uniform(-1, 1, (2, 32, 32))
    x = generate(ckpt, seed=1, indices=[4, 9], sampler="dpm++sde", steps=5, known=known, given=["t1ce"],
                 guidance=16.0)  # fmt: skip
    assert np.abs(x[:, 0] - known[:, 0]).max() < 1e-5


def test_rows_of_several_requests_keep_their_own_known_values_whatever_the_batch(
    ckpt: LoadedCheckpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows of two requests with different masks in one batch equal each request sampled alone,
    also when an out-of-memory error splits the batch."""
    labels = masks(4)
    kw = dict(sampler="dpm++sde", steps=5, given=["seg"], guidance=16.0)
    a = generate(ckpt, seed=1, indices=[0, 1], known=known_seg(labels[:2]), batch_size=2, **kw)  # type: ignore[arg-type]
    b = generate(ckpt, seed=2, indices=[0, 1], known=known_seg(labels[2:]), batch_size=2, **kw)  # type: ignore[arg-type]
    rows = [(1, 0), (2, 0), (1, 1), (2, 1)]
    known = known_seg(labels[[0, 2, 1, 3]])
    merged = generate_rows(ckpt, rows, known=known, batch_size=4, **kw)  # type: ignore[arg-type]
    np.testing.assert_allclose(merged[[0, 2]], a, atol=1e-4)
    np.testing.assert_allclose(merged[[1, 3]], b, atol=1e-4)
    calls = raise_oom_above(monkeypatch, 2)
    limit = BatchLimit()
    split = generate_rows(ckpt, rows, known=known, batch_size=4, limit=limit, **kw)  # type: ignore[arg-type]
    assert calls[0] == 4 and limit.cap == 2
    np.testing.assert_allclose(split, merged, atol=1e-4)
    np.testing.assert_array_equal(split[:, 1], merged[:, 1])


def test_dropped_rows_leave_the_others_unchanged(ckpt: LoadedCheckpoint) -> None:
    labels = masks(3)
    kw = dict(sampler="ddim", steps=5, known=known_seg(labels), given=["seg"], guidance=16.0, batch_size=3)
    rows = [(5, 0), (5, 1), (5, 2)]
    whole = generate_rows(ckpt, rows, **kw)  # type: ignore[arg-type]
    part = generate_rows(ckpt, rows, dropped=lambda: {1}, **kw)  # type: ignore[arg-type]
    np.testing.assert_allclose(part[[0, 2]], whole[[0, 2]], atol=1e-4)


def test_bad_known_arguments_are_refused(ckpt: LoadedCheckpoint) -> None:
    known = known_seg(masks(2))
    with pytest.raises(ValueError, match="not channels of the model"):
        generate(ckpt, seed=0, indices=[0, 1], sampler="ddim", steps=2, known=known, given=["flair"])
    with pytest.raises(ValueError, match="must have shape"):
        generate(ckpt, seed=0, indices=[0], sampler="ddim", steps=2, known=known, given=["seg"])
    with pytest.raises(ValueError, match="int8 has no gradients"):
        generate(ckpt, seed=0, indices=[0, 1], sampler="ddim", steps=2, known=known, given=["seg"],
                 guidance=1.0, precision="int8")  # fmt: skip
