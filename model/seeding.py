"""Per-sample random streams: the determinism-by-seed contract.

Sample `i` of a request with seed `s` draws all of its noise (the starting x_T and
every stochastic sampler step) from its own generator seeded by `(s, i)`, so a sample
does not depend on `count`, on the batch size, or on its batch neighbours.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

MAX_SEED = 2**63 - 1


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit generator seed derived from (request seed, sample index)."""
    digest = hashlib.sha256(f"synthmri:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & MAX_SEED


class PerSampleNoise:
    """Standard-normal noise for a batch, each row from its own sample's generator.

    Noise is always drawn on the CPU in float32 and then moved, so a sample's noise is
    the same on every device and dtype; only the network arithmetic differs.
    """

    def __init__(self, seed: int, indices: Sequence[int]) -> None:
        self.indices = list(indices)
        self.generators = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in self.indices]

    @classmethod
    def for_rows(cls, rows: Sequence[tuple[int, int]]) -> PerSampleNoise:
        """Noise for rows of possibly different requests, each given as (request seed, sample index)."""
        noise = cls(0, [])
        noise.indices = [i for _, i in rows]
        noise.generators = [torch.Generator().manual_seed(sample_seed(s, i)) for s, i in rows]
        return noise

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
        """A (len(self), *shape) float32 tensor, row k from sample k's stream."""
        rows = [torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in self.generators]
        return torch.stack(rows).to(device)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != len(self):
            raise ValueError(f"batch of {x.shape[0]} but noise for {len(self)} samples")
        return self.randn(x.shape[1:], device=x.device).to(x.dtype)
