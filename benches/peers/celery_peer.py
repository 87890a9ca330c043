"""Celery peer of the bgw benchmark: a trivial multiply task on a Redis broker and result
backend, and a driver that measures enqueue, drain and end-to-end rates.

Run by benches/suite.py with the interpreter of target/bench-venvs/celery:

    python celery_peer.py --redis-url redis://127.0.0.1:PORT --count N --workers 2

The driver starts its own worker (prefork pool, `--workers` processes) as a child
process and stops it by pid. It prints one JSON object on stdout.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time

from celery import Celery

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379")
QUEUE = "bench"

app = Celery("celery_peer", broker=f"{REDIS_URL}/0", backend=f"{REDIS_URL}/1")
app.conf.update(
    task_default_queue=QUEUE,
    result_expires=3600,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)


@app.task(name="bench.multiply")
def multiply(x, factor=2):
    """Return the product with the times the task started and ended, for the drain span."""
    started_at = time.time()
    return {"product": x * factor, "started_at": started_at, "finished_at": time.time()}


def submit(count):
    """Send `count` tasks and return their results and the seconds the sends took."""
    started = time.perf_counter()
    results = [multiply.delay(21) for _ in range(count)]
    return results, time.perf_counter() - started


def collect(results, timeout):
    """Wait for every result and return their values."""
    return [result.get(timeout=timeout) for result in results]


def start_worker(workers, log_path):
    """Start a worker with a prefork pool of `workers` processes."""
    command = [
        sys.executable, "-m", "celery", "-A", "celery_peer", "worker",
        "--pool", "prefork", "--concurrency", str(workers), "--queues", QUEUE,
        "--loglevel", "WARNING", "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]
    log = open(log_path, "ab")
    env = dict(os.environ, BENCH_REDIS_URL=REDIS_URL)
    directory = os.path.dirname(os.path.abspath(__file__))
    return subprocess.Popen(command, cwd=directory, env=env, stdout=log, stderr=log)


def stop_worker(worker):
    """Stop the worker by pid: a warm shutdown, then a kill after 10 s."""
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(timeout=10)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--count", type=int, required=True, help="tasks per phase")
    parser.add_argument("--workers", type=int, required=True, help="worker processes")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per phase")
    parser.add_argument("--log", default="celery-worker.log")
    args = parser.parse_args()

    # Drain: tasks queued while no worker runs, timed from the first start to the last end.
    results, enqueue_seconds = submit(args.count)
    worker = start_worker(args.workers, args.log)
    try:
        values = collect(results, args.timeout)
        drain_seconds = max(v["finished_at"] for v in values) - min(v["started_at"] for v in values)

        # End to end: with the worker warm, from the first send to the last end.
        started_at = time.time()
        results, _ = submit(args.count)
        values = collect(results, args.timeout)
        end_to_end_seconds = max(v["finished_at"] for v in values) - started_at
    finally:
        stop_worker(worker)

    print(json.dumps({
        "tasks": args.count,
        "enqueue_rate": args.count / enqueue_seconds,
        "drain_rate": args.count / drain_seconds,
        "end_to_end_rate": args.count / end_to_end_seconds,
    }))


if __name__ == "__main__":
    REDIS_URL = os.environ.get("BENCH_REDIS_URL", REDIS_URL)
    main()
