"""background-workflows 0.3.0 peer of the bgw benchmark: its SQLite task store, its
in-process LocalQueueBackend and a thread pool, with a trivial multiply activity.

Run by benches/suite.py with the interpreter of target/bench-venvs/background-workflows:

    python background_workflows_peer.py --db FILE --count N --threads 2 [--no-cpu-check]

The library's controller checks the CPU load with `psutil.cpu_percent(interval=1)`, which
blocks for one second, once per pass and once per message
(`ThreadPoolManager.get_cpu_usage`). `--no-cpu-check` replaces that method in this
process with one that reports an idle CPU; the installed package is not changed.

The driver calls `MainController.run_once` with as many messages as there are free
threads: `MainController.run` would sleep 10 s between passes, and a message polled
while every thread is busy is deferred, which the in-process queue drops. Prints one
JSON object on stdout.
"""

import argparse
import json
import os
import sqlite3
import threading
import time

from background_workflows.controller.main.main_controller import MainController
from background_workflows.controller.main.thread_pool_manager import ThreadPoolManager
from background_workflows.storage.blobs.local_blob_store import LocalBlobStore
from background_workflows.storage.queue.local_queue_backend import LocalQueueBackend
from background_workflows.storage.tables.sqlite_task_store import SqliteTaskStore
from background_workflows.tasks.process_single_queue import ProcessSingleQueue
from background_workflows.utils.decorators import register_activity
from background_workflows.utils.workflow_client import WorkflowClient

ACTIVITY = "BENCH_MULTIPLY"
RESOURCE = "bench"


@register_activity(ACTIVITY)
class BenchMultiply(ProcessSingleQueue):
    """Doubles `x`, the same work as the bgw example `multiply`."""

    def do_work_on_single(self, payload):
        return json.dumps({"product": payload.get("x", 0) * 2})


def report_idle_cpu(self):
    """Stand-in for ThreadPoolManager.get_cpu_usage that returns at once."""
    return 0.0


def drain(controller, queue, threads, stop):
    """Dispatch queued messages whenever a thread is free, until `stop` is set."""
    pool = controller.thread_pool
    while not stop.is_set():
        free = threads - pool.current_thread_count()
        if free > 0 and queue.queue:
            controller.run_once(max_messages=free)
        else:
            time.sleep(0.0005)


def completed_count(db_path):
    with sqlite3.connect(db_path) as connection:
        (count,) = connection.execute(
            "SELECT count(*) FROM FinishedTasks WHERE status = 'COMPLETED'"
        ).fetchone()
    return count


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True, help="SQLite file to create")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds of draining")
    parser.add_argument("--no-cpu-check", action="store_true")
    args = parser.parse_args()

    if args.no_cpu_check:
        ThreadPoolManager.get_cpu_usage = report_idle_cpu

    store = SqliteTaskStore(db_path=args.db)
    queue = LocalQueueBackend()
    blobs = LocalBlobStore(root_dir=os.path.join(os.path.dirname(args.db), "blobs"))
    client = WorkflowClient(store, queue, blobs)
    controller = MainController(task_store=store, queue_backend=queue, max_threads=args.threads)
    controller.initialize_infrastructure()

    started = time.perf_counter()
    for _ in range(args.count):
        client.start_activity(activity_type=ACTIVITY, resource_id=RESOURCE, x=21)
    enqueue_seconds = time.perf_counter() - started

    # The drain runs in a daemon thread because, with the CPU check on, `run_once` waits
    # as long as the CPU is busier than its threshold (80%), which on a shared machine
    # can be the whole run. The main thread stops counting at the time limit.
    drained = threading.Event()
    threading.Thread(target=drain, args=(controller, queue, args.threads, drained), daemon=True).start()
    started = time.perf_counter()
    deadline = started + args.time_limit
    completed = 0
    last_completion = started
    while time.perf_counter() < deadline and completed < args.count:
        time.sleep(0.05)
        now_completed = completed_count(args.db)
        if now_completed > completed:
            last_completion = time.perf_counter()
        completed = now_completed
    # The in-process queue can drop a deferred message, and then the run waits out its
    # limit. The rates count up to the last completion, so that wait does not lower them.
    drain_seconds = max(last_completion - started, 1e-9)
    drained.set()

    print(json.dumps({
        "tasks": args.count,
        "completed": completed,
        "time_limited": completed < args.count,
        "never_completed": args.count - completed,
        "enqueue_rate": args.count / enqueue_seconds,
        "drain_rate": completed / drain_seconds,
        # Submission and draining run one after the other in this process.
        "end_to_end_rate": completed / (enqueue_seconds + drain_seconds),
    }), flush=True)
    # Threads still inside the CPU check would hold the process for up to seconds more.
    os._exit(0)


if __name__ == "__main__":
    main()
