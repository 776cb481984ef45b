"""Bounded loopback load on the API: POST /v1/jobs and GET /v1/jobs/{id} at a fixed rate.

    python -m benchmarks.load [--rate 100] [--seconds 10] [--warm-up 3]

Starts the real stack with the tiny test checkpoint (random-init, 32²) and a high
SYNTHMRI_MAX_ACTIVE_JOBS_PER_KEY. An open-loop schedule sends `rate` requests per second in
all, not waiting for earlier ones: every other request submits a 1-sample, 1-step job, the
others read back the newest job, so the worker has little to do and the figures are the
API's and Redis's. A warm-up at the same load comes first and is reported apart. Prints
latency percentiles per request kind and the error count (goal: p99 enqueue < 25 ms at
100 requests/s, zero errors).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import httpx

from benchmarks.stack_common import running_stack


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def drive(url: str, key: str, rate: float, seconds: float) -> tuple[dict[str, list[float]], list[str]]:
    lat: dict[str, list[float]] = {"POST /v1/jobs": [], "GET /v1/jobs/{id}": []}
    errors: list[str] = []
    body = {"model": "tiny", "count": 1, "steps": 1, "sampler": "ddim", "formats": ["npz"]}
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30,
                                 limits=limits) as http:  # fmt: skip

        async def timed(kind: str, method: str, path: str, **kw: object) -> httpx.Response | None:
            t0 = time.perf_counter()
            try:
                r = await http.request(method, path, **kw)  # type: ignore[arg-type]
            except httpx.HTTPError as e:
                errors.append(f"{kind}: {type(e).__name__}")
                return None
            lat[kind].append(time.perf_counter() - t0)
            if r.status_code >= 400:
                errors.append(f"{kind}: {r.status_code} {r.text[:120]}")
                return None
            return r

        newest: list[str] = []

        async def submit() -> None:
            r = await timed("POST /v1/jobs", "POST", "/v1/jobs", json=body)
            if r is not None:
                newest.append(r.json()["id"])

        async def read() -> None:
            if newest:
                await timed("GET /v1/jobs/{id}", "GET", f"/v1/jobs/{newest[-1]}")

        tasks = []
        start = time.perf_counter()
        for k in range(int(rate * seconds)):
            delay = start + k / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(submit() if k % 2 == 0 else read()))
        await asyncio.gather(*tasks)
    return lat, errors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=100.0)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--warm-up", type=float, default=3.0, help="seconds of load before the measured run")
    args = p.parse_args(argv)
    env = {"SYNTHMRI_MAX_ACTIVE_JOBS_PER_KEY": "100000", "SYNTHMRI_TASK_BATCH_SIZE": "1"}
    with running_stack("tiny", env) as (stack, key):
        httpx.get(f"{stack.url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30)
        # The same load for a few seconds first, not counted: the API's thread pool and the
        # worker reach their steady state (the figures of that phase are printed too).
        warm, warm_errors = asyncio.run(drive(stack.url, key, args.rate, args.warm_up))
        lat, errors = asyncio.run(drive(stack.url, key, args.rate, args.seconds))
    posts = [1000 * v for v in warm["POST /v1/jobs"]]
    print(f"warm-up: {args.warm_up:.0f} s at the same rate, POST p99 {percentile(posts, 0.99):.1f} ms, "
          f"{len(warm_errors)} errors (not counted below)")
    print(f"{args.rate:.0f} requests/s for {args.seconds:.0f} s, loopback, one API process (tiny model)")
    for kind, values in lat.items():
        ms = [1000 * v for v in values]
        mean = statistics.fmean(ms) if ms else float("nan")
        print(f"{kind:20s} n={len(ms):5d}  p50 {percentile(ms, 0.5):6.1f} ms  "
              f"p99 {percentile(ms, 0.99):6.1f} ms  max {max(ms, default=float('nan')):6.1f} ms  "
              f"mean {mean:6.1f} ms")
    print(f"errors: {len(errors)}" + (f" (first: {errors[0]})" if errors else ""))
    print(f"p99 enqueue: {percentile([1000 * v for v in lat['POST /v1/jobs']], 0.99):.1f} ms  (goal < 25 ms)")
    return 0 if not errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
