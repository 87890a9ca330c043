"""The bgw benchmark suite: runs every phase against real `bgw` daemons and the peers,
prints the table and the `ratio PEER MEASURE VALUE` lines, and writes results.json and
the PNG plots. Started by benches/run, which builds everything and passes the paths.

Every daemon, Redis server and peer worker is started here on 127.0.0.1 and stopped by
its pid. Each phase has a time bound; a phase that would not fit the remaining budget is
skipped and listed under "skipped".
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PAYLOAD = '{"x":21}'


def load_average():
    with open("/proc/loadavg") as file:
        return [float(value) for value in file.read().split()[:3]]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def memory_kib(pid):
    """VmRSS and VmHWM of a process, in KiB."""
    values = {}
    with open(f"/proc/{pid}/status") as file:
        for line in file:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values


class Suite:
    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.work = args.work_dir
        self.deadline = time.monotonic() + args.budget
        self.results = {"quick": self.quick, "load_average": [], "skipped": []}
        self.children = []

    # --- helpers ------------------------------------------------------------------

    def remaining(self):
        return self.deadline - time.monotonic()

    def note_load(self, phase):
        self.results["load_average"].append({"phase": phase, "load": load_average()})

    def skip(self, phase, reason):
        print(f"skipped {phase}: {reason}", file=sys.stderr)
        self.results["skipped"].append({"phase": phase, "reason": reason})

    def bench(self, *arguments, timeout=120):
        """Run a bgw-bench subcommand and return its JSON report."""
        command = [self.args.bench, *map(str, arguments)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()}")
        return json.loads(done.stdout)

    def bgw(self, data_dir, *arguments, timeout=60):
        command = [self.args.bgw, "--data-dir", data_dir, *map(str, arguments)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()}")
        return done.stdout

    def new_data_dir(self, name, synchronous="normal", register=("multiply",)):
        path = os.path.join(self.work, name)
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        if synchronous != "normal":
            with open(os.path.join(path, "bgw.toml"), "w") as file:
                file.write(f'[sqlite]\nsynchronous = "{synchronous}"\n')
        for activity in register:
            wasm = os.path.join(self.args.wasm_dir, f"{activity}.wasm")
            self.bgw(path, "register", activity, wasm, "--max-attempts", "1")
        return path

    # --- the daemon under test ----------------------------------------------------

    def start_daemon(self, data_dir, concurrency):
        log = open(os.path.join(data_dir, f"daemon-{concurrency}.log"), "ab")
        process = subprocess.Popen(
            [self.args.bgw, "--data-dir", data_dir, "daemon", "--concurrency", str(concurrency),
             "--shutdown-grace", "5"],
            stdout=log, stderr=log,
        )
        self.children.append(process)
        sampler = RssSampler(process.pid)
        sampler.start()
        return process, sampler

    def stop(self, process, timeout=15):
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process in self.children:
            self.children.remove(process)

    def stop_all(self):
        for process in list(self.children):
            self.stop(process, timeout=5)

    # --- phases ---------------------------------------------------------------------

    def throughput(self):
        """Enqueue, drain and end-to-end rates per synchronous mode and concurrency.

        Enqueue and end-to-end submit with `start_activities`, 1,000 tasks per call, while
        the one-at-a-time enqueue rate uses a `start_activity` call per task.
        """
        # FULL commits wait for an fsync each, a few hundred a second on this kind of disk.
        counts = {"normal": 2_000, "full": 1_000} if self.quick else {"normal": 20_000, "full": 5_000}
        rows = []
        for synchronous in ("normal", "full"):
            count = counts[synchronous]
            for concurrency in (1, 2, 4):
                phase = f"throughput {synchronous} c={concurrency}"
                if self.remaining() < 60:
                    self.skip(phase, "time budget")
                    continue
                self.note_load(phase)
                data_dir = self.new_data_dir(f"throughput-{synchronous}-{concurrency}", synchronous)
                # One start_activity call per task, so that path stays measured. The daemon
                # drains these first, before the drain below is measured on the bulk ones.
                enqueue_single = self.bench("submit", "--data-dir", data_dir, "--resource",
                                            "single", "--count", count, "--one-at-a-time")
                enqueue = self.bench("submit", "--data-dir", data_dir, "--resource", "drain",
                                     "--count", count)
                daemon, sampler = self.start_daemon(data_dir, concurrency)
                try:
                    drain = self.bench("drain", "--data-dir", data_dir, "--resource", "drain",
                                       "--expect", count, "--timeout", 90)
                    submit = self.bench("submit", "--data-dir", data_dir, "--resource", "e2e",
                                        "--count", count)
                    end_to_end = self.bench("drain", "--data-dir", data_dir, "--resource", "e2e",
                                            "--expect", count, "--timeout", 90,
                                            "--since", submit["started_at"])
                finally:
                    self.stop(daemon)
                    sampler.stop()
                rows.append({
                    "synchronous": synchronous,
                    "concurrency": concurrency,
                    "tasks": count,
                    "submit_api": submit["api"],
                    "submit_batch": submit["batch"],
                    "enqueue_rate": enqueue["rate"],
                    "enqueue_one_at_a_time_rate": enqueue_single["rate"],
                    "drain_rate": drain["rate"],
                    "end_to_end_rate": end_to_end["rate"],
                    "completed": drain["completed"] + end_to_end["completed"],
                    "max_rss_kib": sampler.max_rss,
                })
        self.results["throughput"] = rows

        # The CLI, bulk and one process per task, on the last NORMAL data directory.
        phase = "cli submit"
        self.note_load(phase)
        data_dir = self.new_data_dir("cli-submit")
        bulk = counts["normal"] // 2
        started = time.perf_counter()
        self.bgw(data_dir, "submit", "multiply", "--resource", "cli", "--payload", PAYLOAD,
                 "--count", bulk, timeout=120)
        bulk_rate = bulk / (time.perf_counter() - started)
        processes = 20 if self.quick else 100
        started = time.perf_counter()
        for _ in range(processes):
            self.bgw(data_dir, "submit", "multiply", "--resource", "cli", "--payload", PAYLOAD)
        per_process_rate = processes / (time.perf_counter() - started)
        self.results["cli_submit"] = {"bulk_rate": bulk_rate, "per_process_rate": per_process_rate}

    def latency(self):
        seconds = 4 if self.quick else 20
        data_dir = self.new_data_dir("latency")
        daemon, sampler = self.start_daemon(data_dir, 2)
        rows = []
        try:
            time.sleep(0.5)
            for rate in (100, 1000):
                phase = f"latency {rate}/s"
                self.note_load(phase)
                samples = os.path.join(self.work, f"latency-{rate}.txt")
                report = self.bench("latency", "--data-dir", data_dir, "--resource", f"lat{rate}",
                                    "--rate", rate, "--seconds", seconds, "--samples", samples,
                                    timeout=seconds + 60)
                report["samples_file"] = samples
                rows.append(report)

            phase = "latency cli --wait"
            self.note_load(phase)
            waits = []
            for _ in range(20 if self.quick else 100):
                started = time.perf_counter()
                self.bgw(data_dir, "submit", "multiply", "--resource", "cliwait",
                         "--payload", PAYLOAD, "--wait")
                waits.append((time.perf_counter() - started) * 1e3)
            self.results["latency_cli"] = summarize(waits)
        finally:
            self.stop(daemon)
            sampler.stop()
        self.results["latency"] = rows

    def sandbox(self):
        iterations = 20_000 if self.quick else 100_000
        wasm = os.path.join(self.args.wasm_dir, "multiply.wasm")
        rows = []
        for threads in (1, 2):
            self.note_load(f"sandbox threads={threads}")
            rows.append(self.bench("sandbox", "--wasm", wasm, "--threads", threads,
                                   "--iterations", iterations, timeout=180))
        self.results["sandbox"] = rows

    def swap(self):
        self.note_load("hot swap")
        data_dir = self.new_data_dir("swap")
        daemon, sampler = self.start_daemon(data_dir, 2)
        try:
            time.sleep(0.5)
            report = self.bench("swap", "--data-dir", data_dir, "--resource", "swap",
                                "--bgw", self.args.bgw,
                                "--wasm", os.path.join(self.args.wasm_dir, "multiply.wasm"),
                                "--rate", 500, timeout=90)
        finally:
            self.stop(daemon)
            sampler.stop()
        self.results["swap"] = report

    def scale(self):
        """Drain rate and RSS with a backlog queued ahead, and with a finished history."""
        backlogs = [10_000, 100_000] if self.quick else [10_000, 100_000, 1_000_000]
        window = 5 if self.quick else 15
        rows = []
        for backlog in backlogs:
            phase = f"scale backlog {backlog}"
            # Bulk submits ran at 70,000 to 90,000 tasks/s on 2 cores, so the margin is wide.
            needed = backlog / 3_000 + window + 30
            if not self.quick and backlog == backlogs[-1]:
                # The whole backlog is drained for the history measurement.
                needed += backlog / 5_000
            if self.remaining() < needed:
                self.skip(phase, f"needs about {needed:.0f} s, {self.remaining():.0f} s left")
                continue
            self.note_load(phase)
            data_dir = self.new_data_dir(f"scale-{backlog}")
            enqueue = self.bench("submit", "--data-dir", data_dir, "--resource", "backlog",
                                 "--count", backlog, timeout=needed + 60)
            daemon, sampler = self.start_daemon(data_dir, 2)
            try:
                drain = self.bench("drain", "--data-dir", data_dir, "--resource", "backlog",
                                   "--expect", backlog, "--timeout", window, timeout=window + 60)
                history = None
                if backlog == backlogs[0] or (not self.quick and backlog == backlogs[-1]):
                    # Let the backlog finish, then measure with it all in history: the
                    # smallest as the reference, and in a full run the largest too.
                    finish = 120 + backlog / 5_000
                    self.bench("drain", "--data-dir", data_dir, "--resource", "backlog",
                               "--expect", backlog, "--timeout", finish, timeout=finish + 60)
                    count = 5_000
                    self.bench("submit", "--data-dir", data_dir, "--resource", "after",
                               "--count", count)
                    history = self.bench("drain", "--data-dir", data_dir, "--resource", "after",
                                         "--expect", count, "--timeout", 60)
            finally:
                self.stop(daemon)
                sampler.stop()
            row = {
                "backlog": backlog,
                "enqueue_rate": enqueue["rate"],
                "drain_rate": drain["rate"],
                "max_rss_kib": sampler.max_rss,
                "hwm_kib": sampler.hwm,
            }
            if history is not None:
                row["history_finished"] = backlog
                row["history_drain_rate"] = history["rate"]
            rows.append(row)
        self.results["scale"] = rows

    def memory(self):
        """RSS of an idle daemon and of one running 64 sleeping tasks."""
        self.note_load("memory")
        data_dir = self.new_data_dir("memory", register=("multiply", "hostile"))
        daemon, sampler = self.start_daemon(data_dir, 64)
        try:
            time.sleep(2)
            idle = memory_kib(daemon.pid)
            self.bgw(data_dir, "submit", "hostile", "--resource", "sleepers", "--count", 64,
                     "--payload", '{"mode":"sleep","ms":4000}')
            busy_max = 0
            running = None
            until = time.monotonic() + 4
            while time.monotonic() < until:
                busy_max = max(busy_max, memory_kib(daemon.pid)["VmRSS"])
                if running is None and until - time.monotonic() < 3:
                    running = self.bgw(data_dir, "--json", "list", "--status", "RUNNING")
                time.sleep(0.05)
            hwm = memory_kib(daemon.pid)["VmHWM"]
        finally:
            self.stop(daemon)
            sampler.stop()
        self.results["memory"] = {
            "idle_rss_kib": idle["VmRSS"],
            "running64_rss_kib": busy_max,
            "running64_hwm_kib": hwm,
            "running_when_listed": len(json.loads(running)),
        }

    def peers(self):
        workers = os.cpu_count() or 2
        count = 2_000 if self.quick else 20_000
        self.note_load("celery")
        port = free_port()
        redis = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.children.append(redis)
        try:
            wait_for_port(port)
            url = f"redis://127.0.0.1:{port}"
            env = dict(os.environ, BENCH_REDIS_URL=url)
            done = subprocess.run(
                [self.args.celery_python, os.path.join(HERE, "peers", "celery_peer.py"),
                 "--redis-url", url, "--count", str(count), "--workers", str(workers),
                 "--log", os.path.join(self.work, "celery-worker.log")],
                capture_output=True, text=True, env=env, timeout=240,
            )
            if done.returncode != 0:
                raise RuntimeError(f"celery peer failed: {done.stderr.strip()[-2000:]}")
            celery = json.loads(done.stdout)
            celery["version"] = package_version(self.args.celery_python, "celery")
            self.results["celery"] = celery
        finally:
            self.stop(redis)

        python = self.args.background_workflows_python
        for name, extra, tasks, limit in (
            ("background-workflows", [], 50, 10 if self.quick else 30),
            ("background-workflows-no-cpu-check", ["--no-cpu-check"], 300 if self.quick else 2_000,
             20 if self.quick else 60),
        ):
            self.note_load(name)
            path = os.path.join(self.work, name)
            shutil.rmtree(path, ignore_errors=True)
            os.makedirs(path)
            done = subprocess.run(
                [python, os.path.join(HERE, "peers", "background_workflows_peer.py"),
                 "--db", os.path.join(path, "tasks.db"), "--count", str(tasks),
                 "--threads", str(workers), "--time-limit", str(limit), *extra],
                capture_output=True, text=True, timeout=limit + 120,
            )
            if done.returncode != 0:
                raise RuntimeError(f"{name} peer failed: {done.stderr.strip()[-2000:]}")
            with open(os.path.join(path, "peer.log"), "w") as file:
                file.write(done.stderr)
            self.results[name] = json.loads(done.stdout)

    def run(self):
        self.results["machine"] = machine()
        started = time.monotonic()
        try:
            for phase in (self.sandbox, self.throughput, self.latency, self.swap, self.memory,
                          self.peers, self.scale):
                phase_started = time.monotonic()
                phase()
                print(f"{phase.__name__}: {time.monotonic() - phase_started:.0f} s", file=sys.stderr)
        finally:
            self.stop_all()
        self.results["seconds"] = time.monotonic() - started
        self.note_load("end")
        return self.results


class RssSampler(threading.Thread):
    """Samples VmRSS of a process every 100 ms and keeps the maximum and the last VmHWM."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid = pid
        self.max_rss = 0
        self.hwm = 0
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.is_set():
            try:
                values = memory_kib(self.pid)
            except (FileNotFoundError, ProcessLookupError):
                return
            self.max_rss = max(self.max_rss, values.get("VmRSS", 0))
            self.hwm = values.get("VmHWM", self.hwm)
            self.stopped.wait(0.1)

    def stop(self):
        self.stopped.set()
        self.join(timeout=1)


def wait_for_port(port, timeout=10):
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def package_version(python, package):
    done = subprocess.run([python, "-c", f"import importlib.metadata as m; print(m.version('{package}'))"],
                          capture_output=True, text=True)
    return done.stdout.strip()


def summarize(values):
    ordered = sorted(values)
    def rank(percent):
        index = max(1, -(-len(ordered) * percent // 100)) - 1
        return ordered[int(index)]
    return {"count": len(ordered), "p50_ms": rank(50), "p99_ms": rank(99), "max_ms": ordered[-1]}


def machine():
    model = "unknown"
    with open("/proc/cpuinfo") as file:
        for line in file:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as file:
        total_kib = int(file.readline().split()[1])
    revision = subprocess.run(["git", "-C", HERE, "describe", "--always", "--dirty"],
                              capture_output=True, text=True).stdout.strip()
    return {
        "revision": revision,
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(total_kib / 1024 / 1024, 1),
        "kernel": os.uname().release,
    }


def main():
    parser = argparse.ArgumentParser(description="bgw benchmark suite")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--bgw", required=True)
    parser.add_argument("--bench", required=True, help="the bgw-bench executable")
    parser.add_argument("--wasm-dir", required=True)
    parser.add_argument("--celery-python", required=True)
    parser.add_argument("--background-workflows-python", required=True)
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--plots", help="folder for the PNG plots; default: the work folder")
    parser.add_argument("--budget", type=float, help="seconds for all phases")
    args = parser.parse_args()
    if args.budget is None:
        args.budget = 270 if args.quick else 1_140

    os.makedirs(args.work_dir, exist_ok=True)
    results = Suite(args).run()
    with open(os.path.join(args.work_dir, "results.json"), "w") as file:
        json.dump(results, file, indent=2)

    sys.path.insert(0, HERE)
    import report

    report.print_table(results)
    report.plot(results, args.plots or args.work_dir)


if __name__ == "__main__":
    main()
