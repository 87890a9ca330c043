"""Turns the suite's results into the printed table, the `ratio PEER MEASURE VALUE` lines
and the PNG plots. `python benches/report.py RESULTS.json [PLOT_DIR]` redraws them from
a saved run.
"""

import json
import os
import sys

PEERS = ("celery", "background-workflows", "background-workflows-no-cpu-check")
RATE_MEASURES = ("enqueue_rate", "drain_rate", "end_to_end_rate")


def reference_row(results):
    """Return the bgw row that peers are compared with: synchronous=NORMAL at concurrency 2."""
    for row in results.get("throughput", []):
        if row["synchronous"] == "normal" and row["concurrency"] == 2:
            return row
    return None


def targets(results):
    """List each target as (name, figure, target, met), leaving out figures the run lacks."""
    rows = []
    reference = reference_row(results)
    sandbox = {row["threads"]: row for row in results.get("sandbox", [])}
    if reference:
        figure = reference["end_to_end_rate"]
        rows.append(("end-to-end, NORMAL, c=2 (tasks/s)", figure, ">= 10000", figure >= 10_000))
        if "celery" in results:
            ratio = figure / results["celery"]["end_to_end_rate"]
            rows.append(("end-to-end / Celery", ratio, ">= 20", ratio >= 20))
        if 2 in sandbox:
            ratio = figure / sandbox[2]["rate"]
            rows.append(("end-to-end / bare sandbox loop, 2 threads", ratio, ">= 0.5", ratio >= 0.5))
    if 1 in sandbox:
        figure = sandbox[1]["p50_us"]
        rows.append(("instantiate + call p50 (us)", figure, "<= 20", figure <= 20))
    for row in results.get("latency", []):
        if row["rate"] == 1000:
            rows.append(("latency p50 at 1000/s (ms)", row["p50_ms"], "<= 1", row["p50_ms"] <= 1))
            rows.append(("latency p99 at 1000/s (ms)", row["p99_ms"], "<= 5", row["p99_ms"] <= 5))
    scale = results.get("scale", [])
    if scale:
        base = scale[0]["drain_rate"]
        for row in scale[1:]:
            ratio = row["drain_rate"] / base
            rows.append((f"drain with {row['backlog']} queued / with {scale[0]['backlog']}",
                         ratio, ">= 0.8 (at 1M)", ratio >= 0.8))
        if "history_drain_rate" in scale[0]:
            reference = scale[0]["history_drain_rate"]
            ratio = reference / base
            rows.append((f"drain with {scale[0]['history_finished']} finished / empty history",
                         ratio, ">= 0.8 (at 1M)", ratio >= 0.8))
            for row in scale[1:]:
                if "history_drain_rate" in row:
                    ratio = row["history_drain_rate"] / reference
                    rows.append((f"drain with {row['history_finished']} finished / with "
                                 f"{scale[0]['history_finished']} finished",
                                 ratio, ">= 0.8", ratio >= 0.8))
    memory = results.get("memory")
    if memory:
        idle = memory["idle_rss_kib"] / 1024
        busy = memory["running64_rss_kib"] / 1024
        rows.append(("idle daemon RSS (MiB)", idle, "< 30", idle < 30))
        rows.append(("RSS with 64 running (MiB)", busy, "< 200", busy < 200))
    swap = results.get("swap", {})
    if swap.get("first_start_after_return_ms") is not None:
        figure = swap["first_start_after_return_ms"]
        rows.append(("register return to first task on it (ms)", figure, "<= 100", figure <= 100))
    return rows


def print_table(results):
    print(f"bgw benchmark ({'quick' if results['quick'] else 'full'} run, "
          f"{results.get('seconds', 0):.0f} s)")
    machine = results["machine"]
    print(f"machine: {machine['nproc']} cores, {machine['cpu_model']}, {machine['memory_gib']} GiB; "
          f"revision {machine.get('revision', 'unknown')}")
    loads = [entry["load"][0] for entry in results["load_average"]]
    if loads:
        print(f"load average (1 min) during the run: {min(loads):.2f} to {max(loads):.2f}")

    print("\nthroughput (tasks/s)")
    rows = results.get("throughput", [])
    if rows and "submit_api" in rows[0]:
        print(f"enqueue and end-to-end submit with {rows[0]['submit_api']}, "
              f"{rows[0]['submit_batch']} tasks per call; 'one by one' is a start_activity "
              f"call per task")
    print(f"{'synchronous':<12}{'c':>3}{'one by one':>12}{'enqueue':>10}{'drain':>10}"
          f"{'end-to-end':>12}{'max RSS MiB':>13}")
    for row in rows:
        single = row.get("enqueue_one_at_a_time_rate")
        single_text = "-" if single is None else f"{single:.0f}"
        print(f"{row['synchronous']:<12}{row['concurrency']:>3}{single_text:>12}"
              f"{row['enqueue_rate']:>10.0f}{row['drain_rate']:>10.0f}"
              f"{row['end_to_end_rate']:>12.0f}{row['max_rss_kib'] / 1024:>13.1f}")
    cli = results.get("cli_submit")
    if cli:
        print(f"CLI submit: {cli['bulk_rate']:.0f} tasks/s with --count, "
              f"{cli['per_process_rate']:.1f} tasks/s with one process per task")

    print("\nlatency, submit to COMPLETED (ms)")
    for row in results.get("latency", []):
        print(f"  Rust client at {row['rate']:.0f}/s: p50 {row['p50_ms']:.2f}  p99 {row['p99_ms']:.2f}"
              f"  max {row['max_ms']:.2f}  ({row['observed']} tasks, {row['unfinished']} unfinished)")
    cli = results.get("latency_cli")
    if cli:
        print(f"  CLI submit --wait, one process per task: p50 {cli['p50_ms']:.1f}  "
              f"p99 {cli['p99_ms']:.1f}  max {cli['max_ms']:.1f}")

    print("\nsandbox, bare Sandbox::run loop")
    for row in results.get("sandbox", []):
        print(f"  {row['threads']} thread(s): p50 {row['p50_us']:.1f} us  p99 {row['p99_us']:.1f} us"
              f"  {row['rate']:.0f} runs/s")
    swap = results.get("swap")
    if swap:
        first = swap["first_start_after_return_ms"]
        first_text = "none seen" if first is None else f"{first:.1f} ms"
        print(f"  hot swap: first task on the new version started {first_text} after "
              f"`bgw register` returned ({swap['register_seconds']:.2f} s to register)")

    print("\nscale (concurrency 2, NORMAL)")
    for row in results.get("scale", []):
        line = (f"  {row['backlog']:>9} queued: drain {row['drain_rate']:.0f} tasks/s, "
                f"max RSS {row['max_rss_kib'] / 1024:.1f} MiB, VmHWM {row['hwm_kib'] / 1024:.1f} MiB")
        if "history_drain_rate" in row:
            line += (f"; after all finished, {row['history_drain_rate']:.0f} tasks/s "
                     f"with {row['history_finished']} in history")
        print(line)
    memory = results.get("memory")
    if memory:
        print(f"  idle daemon RSS {memory['idle_rss_kib'] / 1024:.1f} MiB; "
              f"64 sleeping tasks: RSS {memory['running64_rss_kib'] / 1024:.1f} MiB, "
              f"VmHWM {memory['running64_hwm_kib'] / 1024:.1f} MiB "
              f"({memory['running_when_listed']} listed RUNNING)")

    print("\npeers (tasks/s; the peers submit one task per call)")
    print(f"{'':<36}{'enqueue':>10}{'drain':>10}{'end-to-end':>12}")
    reference = reference_row(results)
    if reference:
        print(f"{'bgw, NORMAL, c=2':<36}{reference['enqueue_rate']:>10.0f}"
              f"{reference['drain_rate']:>10.0f}{reference['end_to_end_rate']:>12.0f}")
        single = reference.get("enqueue_one_at_a_time_rate")
        if single is not None:
            print(f"{'bgw, NORMAL, one call per task':<36}{single:>10.0f}")
    for peer in PEERS:
        if peer in results:
            row = results[peer]
            lost = row.get("never_completed")
            note = f"  ({lost} of {row['tasks']} never completed)" if lost else ""
            print(f"{peer:<36}{row['enqueue_rate']:>10.1f}{row['drain_rate']:>10.1f}"
                  f"{row['end_to_end_rate']:>12.1f}{note}")

    print("\ntargets")
    for name, figure, target, met in targets(results):
        print(f"  {'met ' if met else 'MISS'} {name}: {figure:.2f} (target {target})")
    for entry in results.get("skipped", []):
        print(f"  skipped {entry['phase']}: {entry['reason']}")

    print()
    for peer in PEERS:
        if reference and peer in results:
            for measure in RATE_MEASURES:
                value = results[peer][measure]
                ratio = reference[measure] / value if value else float("inf")
                print(f"ratio {peer} {measure} {ratio:.2f}")


def plot(results, folder):
    """Write bgw-throughput.png and bgw-latency.png into `folder`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    machine = results["machine"]
    loads = [entry["load"][0] for entry in results["load_average"]]
    subtitle = (f"{machine['nproc']} cores, {machine['cpu_model']}; "
                f"load average {min(loads):.1f}-{max(loads):.1f}")

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for synchronous, style in (("normal", "-o"), ("full", "--s")):
        rows = [row for row in results.get("throughput", []) if row["synchronous"] == synchronous]
        if rows:
            axis.plot([row["concurrency"] for row in rows], [row["end_to_end_rate"] for row in rows],
                      style, label=f"bgw end-to-end, synchronous={synchronous.upper()}")
            axis.plot([row["concurrency"] for row in rows], [row["drain_rate"] for row in rows],
                      style, alpha=0.5, label=f"bgw drain, synchronous={synchronous.upper()}")
    if "celery" in results:
        axis.axhline(results["celery"]["end_to_end_rate"], color="grey", linestyle=":",
                     label=f"Celery {results['celery'].get('version', '')}, {machine['nproc']} processes")
    axis.axhline(10_000, color="red", linestyle="-.", linewidth=0.8, label="target 10,000/s")
    axis.set_xlabel("daemon concurrency (--concurrency)")
    axis.set_ylabel("tasks/s")
    axis.set_xticks([1, 2, 4])
    axis.set_yscale("log")
    axis.set_title(f"Throughput of trivial tasks\n{subtitle}", fontsize=9)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(os.path.join(folder, "bgw-throughput.png"), dpi=110)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for row in results.get("latency", []):
        path = row.get("samples_file")
        if not path or not os.path.exists(path):
            continue
        with open(path) as file:
            values = sorted(float(line) for line in file if line.strip())
        if values:
            fractions = [(index + 1) / len(values) for index in range(len(values))]
            axis.plot(values, fractions, label=f"{row['rate']:.0f} tasks/s offered")
    axis.axvline(1, color="red", linestyle="-.", linewidth=0.8, label="targets: p50 1 ms, p99 5 ms")
    axis.axvline(5, color="red", linestyle="-.", linewidth=0.8)
    axis.set_xscale("log")
    axis.set_xlabel("submit to COMPLETED (ms), Rust client, concurrency 2")
    axis.set_ylabel("fraction of tasks")
    axis.set_title(f"Latency distribution (CDF)\n{subtitle}", fontsize=9)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(os.path.join(folder, "bgw-latency.png"), dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    with open(sys.argv[1]) as file:
        saved = json.load(file)
    print_table(saved)
    plot(saved, sys.argv[2] if len(sys.argv) > 2 else os.path.dirname(sys.argv[1]))
