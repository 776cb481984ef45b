"""Service overhead: a job's end-to-end time through the real stack vs sampling the same samples
in-process with model.generate.

    python -m benchmarks.service_overhead [--count 16] [--model demo|tiny] [--steps 20] [--repeats 2]

End to end = POST /v1/jobs → GET reports `succeeded` (queueing, Redis, sampling, NIfTI/PNG
writing, grid, manifest, zip, polling). Pure sampling = `generate()` on the same checkpoint,
seed, indices, sampler, steps, device and precision, one batch of `count`. The stack is stopped
before the in-process timing, so the two never share the CPU. Each side: best of `repeats`
after one warm-up. Prints the overhead (goal ≤ 5 % for a 16-sample job).
"""

from __future__ import annotations

import argparse
import time

from benchmarks.stack_common import Client, running_stack


def pure_sampling(model: str, count: int, seed: int, sampler: str, steps: int, repeats: int) -> float:
    """Best-of-`repeats` seconds of `generate()` for the job's samples, in this process."""
    import tempfile
    from pathlib import Path

    from benchmarks.stack_common import models_dir
    from model.checkpoint import load_checkpoint
    from model.generate import generate
    from worker.engine import sampling_precision

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = load_checkpoint(models_dir(Path(tmp), model) / model)
    precision = sampling_precision("auto", "cpu")
    kw = dict(seed=seed, indices=range(count), sampler=sampler, steps=steps, batch_size=count,
              device="cpu", precision=precision)  # fmt: skip
    generate(ckpt, **kw)  # type: ignore[arg-type]  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        generate(ckpt, **kw)  # type: ignore[arg-type]
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=16)
    p.add_argument("--model", default="demo", choices=["demo", "tiny"])
    p.add_argument("--sampler", default="dpm++")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    n = args.count
    env = {"SYNTHMRI_MAX_BATCH_SIZE": str(n), "SYNTHMRI_MAX_COUNT": str(n),
           "SYNTHMRI_TASK_BATCH_SIZE": str(n), "SYNTHMRI_PROGRESS_INTERVAL_SECONDS": "0.5",
           # The in-process reference runs at normal priority, so the worker does too.
           "SYNTHMRI_WORKER_NICENESS": "0"}  # fmt: skip
    body = {"model": args.model, "sampler": args.sampler, "steps": args.steps, "count": n, "seed": 3}
    with running_stack(args.model, env) as (stack, key):
        api = Client(stack, key)
        api.wait(api.submit(**body))  # warm-up
        e2e = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            api.wait(api.submit(**body))
            e2e = min(e2e, time.perf_counter() - t0)
    pure = pure_sampling(args.model, n, 3, args.sampler, args.steps, args.repeats)
    print(f"model {args.model}, {args.sampler} {args.steps} steps, {n} samples (nifti + png), one CPU worker")
    print(f"end to end (POST → succeeded): {e2e:8.2f} s")
    print(f"pure sampling (generate):      {pure:8.2f} s")
    print(f"service overhead: {100 * (e2e / pure - 1):.1f} %  (goal ≤ 5 %)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
