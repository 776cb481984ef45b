"""benchmarks/gpu_check.py in its tiny --smoke mode, so that it runs first time when a GPU is lent:
every check must be listed as run or as skipped with a reason, and none may fail. On a machine
without CUDA the CUDA-only checks are skipped (with the reason) and the rest run on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.gpu_check import main

CHECKS = {"precision_bf16", "precision_fp16", "throughput_64", "throughput_128", "throughput_256", "ddp_nccl",
          "stack_job"}  # fmt: skip


@pytest.mark.timeout(600)
def test_smoke_run_lists_every_check_as_run_or_skipped_with_a_reason(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    assert main(["--smoke", "--out", str(out), "--reference", str(tmp_path / "no-checkout")]) == 0
    report = json.loads(out.read_text())
    checks = report["checks"]
    assert set(checks) == CHECKS
    for name, result in checks.items():
        assert result["status"] in ("ran", "skipped"), (name, result)
        if result["status"] == "skipped":
            assert result["reason"], name
    if not torch.cuda.is_available():
        assert checks["precision_bf16"]["reason"] == "no CUDA device"
    for size in (64, 128, 256):
        t = checks[f"throughput_{size}"]
        assert t["status"] == "ran" and t["ours_s_per_sample"] > 0
        assert t["reference"].startswith("skipped: no improved-diffusion checkout")
    assert checks["stack_job"]["status"] == "ran" and checks["ddp_nccl"]["status"] == "ran"
