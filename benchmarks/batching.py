"""Cross-request batching through the real stack: N concurrent 1-sample jobs vs one N-sample job
vs N sequential 1-sample jobs.

    python -m benchmarks.batching [--n 16] [--model demo|tiny] [--steps 20] [--sampler dpm++] [--rounds 3]

Starts Redis, one CPU worker and the API (synthmri.localstack), warms the worker up with one
job, then times in alternating rounds: one job of N samples; N jobs of one sample submitted at
once (the worker merges the waiting ones into one sampling batch). Then, once, N jobs of one
sample one after the other. Prints wall times and the ratios; "concurrent vs one job" is the
throughput of N concurrent jobs as a fraction of the one N-sample job's, the median of the
per-round ratios (goal ≥ 0.85), so a drift in the machine's speed hits both sides alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from benchmarks.stack_common import Client, running_stack


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--model", default="demo", choices=["demo", "tiny"])
    p.add_argument("--sampler", default="dpm++")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    n = args.n
    env = {"SYNTHMRI_MAX_BATCH_SIZE": str(n), "SYNTHMRI_MAX_COUNT": str(n), "SYNTHMRI_TASK_BATCH_SIZE": "8",
           "SYNTHMRI_MAX_ACTIVE_JOBS_PER_KEY": str(4 * n),
           "SYNTHMRI_PROGRESS_INTERVAL_SECONDS": "0.5"}  # fmt: skip
    body = {"model": args.model, "sampler": args.sampler, "steps": args.steps, "formats": ["nifti"]}
    with running_stack(args.model, env) as (stack, key):
        api = Client(stack, key)
        api.wait(api.submit(count=n, seed=0, **body))  # warm-up: model load, first-call costs

        ones, concurrents = [], []
        for r in range(args.rounds):
            t0 = time.perf_counter()
            api.wait(api.submit(count=n, seed=1 + r, **body))
            ones.append(time.perf_counter() - t0)

            seeds = [1000 * (r + 1) + i for i in range(n)]
            t0 = time.perf_counter()
            with ThreadPoolExecutor(8) as pool:
                ids = list(pool.map(lambda seed: api.submit(count=1, seed=seed, **body), seeds))
                list(pool.map(api.wait, ids))
            concurrents.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        for i in range(n):
            api.wait(api.submit(count=1, seed=200 + i, **body))
        sequential = time.perf_counter() - t0

    ratios = [a / b for a, b in zip(ones, concurrents, strict=True)]
    one, concurrent = statistics.median(ones), statistics.median(concurrents)
    print(f"model {args.model}, {args.sampler} {args.steps} steps, N = {n}, one CPU worker")
    print(f"one job of {n} samples:         {one:8.2f} s  (median)")
    print(f"{n} concurrent 1-sample jobs:  {concurrent:8.2f} s  (median)")
    print(f"{n} sequential 1-sample jobs:  {sequential:8.2f} s")
    print(f"concurrent vs one job (throughput): {statistics.median(ratios):.2f}  (median of {args.rounds} "
          f"rounds: {', '.join(f'{x:.2f}' for x in ratios)}; goal ≥ 0.85)")
    print(f"concurrent vs sequential (speed-up): {sequential / concurrent:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
