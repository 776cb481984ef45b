#!/usr/bin/env bash
# Start one Celery worker process per visible GPU, each pinned to its GPU with
# CUDA_VISIBLE_DEVICES, solo pool, concurrency 1 and prefetch 1 (long tasks, late acks).
# If any of them exits, stop the others and exit with its status so the container
# restarts as a whole instead of running with fewer GPUs than it reserved.
#   SYNTHMRI_WORKER_GPUS   number of worker processes (default: GPUs torch can see, at least 1)
#   extra arguments        passed on to every `celery worker`
set -euo pipefail

gpus=${SYNTHMRI_WORKER_GPUS:-$(python -c 'import torch; print(torch.cuda.device_count())')}
if [ "$gpus" -lt 1 ]; then
    echo "worker-entrypoint: no GPU visible; starting one CPU worker" >&2
    gpus=1
    export SYNTHMRI_DEVICE=cpu
fi

pids=()
stop_all() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait || true
}
trap 'stop_all; exit 143' TERM INT

for ((i = 0; i < gpus; i++)); do
    CUDA_VISIBLE_DEVICES=$i celery -A worker.celery_app:app worker --pool solo \
        --loglevel INFO --concurrency 1 --prefetch-multiplier 1 \
        --hostname "gpu${i}@%h" "$@" &
    pids+=("$!")
    echo "worker-entrypoint: GPU $i -> celery worker pid ${pids[-1]}" >&2
done

set +e
wait -n "${pids[@]}"
status=$?
set -e
echo "worker-entrypoint: a worker exited with status $status; stopping the others" >&2
stop_all
exit $(( status == 0 ? 1 : status ))
