"""Service overhead: a job's end-to-end time through the real stack vs sampling the same samples
in-process with model.generate.

    python -m benchmarks.service_overhead [--count 16] [--model demo|tiny] [--steps 20] [--rounds 5]

End to end = POST /v1/jobs → GET reports `succeeded` (queueing, Redis, sampling, NIfTI/PNG
writing, grid, manifest, zip, polling). Pure sampling = `generate()` on the same checkpoint,
seed, indices, sampler, steps, device and precision, one batch of `count`, in this process
while the stack sits idle. After one warm-up of each, the two are timed in alternating rounds
and the overhead is the median of the per-round ratios, so a drift in the machine's speed
(other load, clocks) hits both sides of a ratio alike. Goal ≤ 5 % for a 16-sample job. It
also prints the time around the worker's own sampling of each job (`sampling_seconds` in the
job's manifest): what the service adds, free of differences in sampling speed between two
processes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from benchmarks.stack_common import Client, running_stack


def pure_sampler(model: str, count: int, seed: int, sampler: str, steps: int) -> Callable[[], float]:
    """A function timing one `generate()` of the job's samples in this process (after a warm-up)."""
    import tempfile
    from pathlib import Path

    from benchmarks.stack_common import models_dir
    from model.checkpoint import load_checkpoint
    from model.generate import generate
    from worker.engine import sampling_precision

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = load_checkpoint(models_dir(Path(tmp), model) / model)
    precision = sampling_precision("auto", "cpu")

    def run() -> float:
        t0 = time.perf_counter()
        generate(ckpt, seed=seed, indices=range(count), sampler=sampler, steps=steps, batch_size=count,
                 device="cpu", precision=precision)  # fmt: skip
        return time.perf_counter() - t0

    run()
    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=16)
    p.add_argument("--model", default="demo", choices=["demo", "tiny"])
    p.add_argument("--sampler", default="dpm++")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    n = args.count
    env = {"SYNTHMRI_MAX_BATCH_SIZE": str(n), "SYNTHMRI_MAX_COUNT": str(n),
           "SYNTHMRI_TASK_BATCH_SIZE": str(n), "SYNTHMRI_PROGRESS_INTERVAL_SECONDS": "0.5",
           # The in-process reference runs at normal priority, so the worker does too.
           "SYNTHMRI_WORKER_NICENESS": "0"}  # fmt: skip
    body = {"model": args.model, "sampler": args.sampler, "steps": args.steps, "count": n, "seed": 3}
    e2e, pure, inside = [], [], []
    with running_stack(args.model, env) as (stack, key):
        api = Client(stack, key)
        api.wait(api.submit(**body))  # warm-up
        sample = pure_sampler(args.model, n, 3, args.sampler, args.steps)
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            job_id = api.submit(**body)
            api.wait(job_id)
            e2e.append(time.perf_counter() - t0)
            timings = api.http.get(f"/v1/jobs/{job_id}/manifest.json").json()["timings"]
            inside.append(timings["sampling_seconds"])
            pure.append(sample())
    ratios = [a / b for a, b in zip(e2e, pure, strict=True)]
    print(f"model {args.model}, {args.sampler} {args.steps} steps, {n} samples (nifti + png), one CPU worker")
    print(f"end to end (POST → succeeded): median {statistics.median(e2e):6.2f} s  "
          f"({min(e2e):.2f}–{max(e2e):.2f} over {args.rounds} rounds)")
    print(f"pure sampling (generate):      median {statistics.median(pure):6.2f} s  "
          f"({min(pure):.2f}–{max(pure):.2f})")
    print(f"service overhead: {100 * (statistics.median(ratios) - 1):.1f} %  (median of per-round ratios, "
          f"{100 * (min(ratios) - 1):.1f} … {100 * (max(ratios) - 1):.1f} %; goal ≤ 5 %)")
    # The same job's own sampling time, from its manifest: what the service adds around the
    # network, free of the run-to-run variation of sampling speed between two processes.
    added = [a - b for a, b in zip(e2e, inside, strict=True)]
    own = [a / b - 1 for a, b in zip(e2e, inside, strict=True)]
    print(f"sampling inside the worker:    median {statistics.median(inside):6.2f} s  "
          f"({min(inside):.2f}–{max(inside):.2f})")
    print(f"around it (queue, writes, polling): median {statistics.median(added):.2f} s = "
          f"{100 * statistics.median(own):.1f} % of the worker's own sampling time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
