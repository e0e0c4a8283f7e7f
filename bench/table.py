"""The performance table of docs/performance.md, regenerated: every figure a median of `--runs`
runs with its spread (min-max), the decode-only ceiling measured in the same sitting, the
machine and the versions.

    python bench/table.py                 # about 40 minutes with --runs 3
    python bench/table.py --runs 1 --quick   # one pass over a smaller workload, to try it

Rows: the in-process pipeline against its ceiling (bench/pipeline.py); a Redis drain (the
exporter and a bare Celery Receiver, paused while the workload is published, then resumed);
a Redis burst at full speed against the server's default pub/sub limit; Redis and RabbitMQ
live at 1k, 5k and 20k events/s sent one message at a time; the scrape at 50 and 2,000 task
names (bench/scrape.py). Needs redis-server on PATH and RabbitMQ at 127.0.0.1:5672.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

HERE = Path(__file__).resolve().parent


def spread(values: list[float], fmt: str = "{:,.0f}") -> str:
    if not values:
        return "n/a"
    median = statistics.median(values)
    if len(values) == 1:
        return fmt.format(median)
    return f"{fmt.format(median)} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def run(args: list[str], runs: int) -> tuple[list[list[dict]], int]:
    """bench/run.py `args`, `runs` times: the results of the runs that succeeded (one list per
    run, one entry per subject) and how many failed (each says why on stderr). A failed run
    costs only itself: the row shows the others and says how many failed."""
    out = []
    failed = 0
    for number in range(runs):
        with tempfile.NamedTemporaryFile(suffix=".json") as result:
            command = [sys.executable, str(HERE / "run.py"), *args, "--json", result.name]
            print(f"  [{number + 1}/{runs}] run.py {' '.join(args)}", file=sys.stderr, flush=True)
            # Its own process group: a run that hangs is stopped with what it started (exporter,
            # redis-server, Receiver), which would otherwise skew every later row.
            proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, start_new_session=True)
            try:
                code: object = proc.wait(timeout=1800)
            except subprocess.TimeoutExpired:
                code = "timed out after 1800 s"
            stop_group(proc)
            if code != 0:
                print(f"  run.py {' '.join(args)} failed: {code}", file=sys.stderr, flush=True)
                failed += 1
                continue
            out.append(json.loads(Path(result.name).read_text()))
    return out, failed


def failures(failed: int, runs: int) -> str:
    return f" ({failed} of {runs} runs failed: see stderr)" if failed else ""


def stop_group(proc: subprocess.Popen) -> None:
    """Interrupt run.py's process group (its cleanup runs), then kill what is left of it."""
    for sig in (signal.SIGINT, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


def row(line: str) -> None:
    print(line, flush=True)


def by_subject(results: list[list[dict]], subject: str) -> list[dict]:
    return [r for each in results for r in each if r["subject"].startswith(subject)]


def rate(r: dict) -> float:
    return r["counted"] / r["seconds"]


def lost(rows: list[dict]) -> str:
    total = sum(r["published"] - r["counted"] for r in rows)
    return "0 lost" if total == 0 else f"**{total:,} lost**"


def output(script: str, *arguments: object) -> list[str]:
    """The lines another benchmark of bench/ prints; if it fails, a line that says so (its
    error goes to stderr), so the rest of the table is still measured."""
    command = [sys.executable, str(HERE / script), *map(str, arguments)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=HERE)
    if result.returncode != 0:
        print(result.stderr, file=sys.stderr, flush=True)
        return [f"{script} failed (exit {result.returncode}): see stderr"]
    return result.stdout.splitlines()


def ceiling_now(tasks: int, runs: int) -> str:
    """The decode-only ceiling, measured again: this VM's speed drifts within a sitting."""
    for line in output("pipeline.py", "--tasks", tasks, "--runs", runs):
        if line.strip().startswith(("ceiling", "pipeline.py failed")):
            return line.strip()
    return "ceiling: not printed"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="10k tasks instead of 50k")
    args = parser.parse_args()
    tasks = 10_000 if args.quick else 50_000
    events = f"{tasks * 4 + tasks // 25:,}"
    started = time.monotonic()
    print(f"# celery-obs performance, {time.strftime('%Y-%m-%d')}, medians of {args.runs}\n")
    print(
        f"Machine: {os.cpu_count()} cores, {platform.machine()}, Linux {platform.release()}, "
        f"Python {platform.python_version()}. Versions: "
        + ", ".join(
            f"{name} {version(name)}" for name in ("celery", "kombu", "redis", "amqp", "hiredis")
        )
        + f". Workload: {events} events ({tasks:,} tasks, 20 workers, 50 names).\n"
    )
    print("In process (bench/pipeline.py), events/s:\n")
    for line in output("pipeline.py", "--tasks", tasks, "--runs", args.runs):
        print(f"    {line.strip()}")
    print()
    # Each row is printed once measured: a long sitting that fails late keeps what it measured.
    print("| measure | bare Receiver | celery-obs exporter |\n|---|---|---|", flush=True)
    drain, failed = run(["drain", "--tasks", str(tasks)], args.runs)
    ours, theirs = by_subject(drain, "celery-obs"), by_subject(drain, "celery Receiver")
    row(
        f"| Redis drain, events/s{failures(failed, args.runs)} | "
        f"{spread([rate(r) for r in theirs])} | "
        f"**{spread([rate(r) for r in ours])}**, {lost(ours)} |"
    )
    row(
        f"| Redis drain, CPU s / peak RSS MB | | "
        f"{spread([r['cpu'] for r in ours], '{:.1f}')} / "
        f"{spread([r['peak_rss_mb'] for r in ours])} |"
    )
    burst, failed = run(
        ["burst", "--tasks", str(tasks), "--batch", "24", "--subjects", "exporter"], args.runs
    )
    ours = by_subject(burst, "celery-obs")
    row(
        f"| Redis burst, full speed, default pub/sub limit: CPU s / peak RSS MB"
        f"{failures(failed, args.runs)} | | "
        f"{spread([r['cpu'] for r in ours], '{:.1f}')} / "
        f"{spread([r['peak_rss_mb'] for r in ours])}, {lost(ours)} |"
    )
    for broker in ("redis", "amqp"):
        for offered in (1000, 5000, 20000):
            name = f"{'Redis' if broker == 'redis' else 'RabbitMQ'} live at {offered:,} events/s"
            live, failed = run(
                [
                    *("live", "--broker", broker, "--tasks", str(tasks)),
                    *("--rate", str(offered), "--subjects", "exporter"),
                ],
                args.runs,
            )
            ours = by_subject(live, "celery-obs")
            per_200k = [r["cpu"] * 200_000 / r["counted"] for r in ours if r["counted"]]
            row(
                f"| {name}: CPU s per 200k / peak RSS MB{failures(failed, args.runs)} | | "
                f"{spread(per_200k, '{:.1f}')} / {spread([r['peak_rss_mb'] for r in ours])}, "
                f"{lost(ours)} |"
            )
    print("\nScrape (bench/scrape.py), median of 20 renderings:\n")
    for names in (50, 2000):
        for line in output("scrape.py", "--names", names, "--tasks", tasks):
            print(f"    {names:>5} names  {line}")
    print(f"\nAt the end of the sitting: {ceiling_now(tasks, args.runs)}")
    print(f"\n(took {(time.monotonic() - started) / 60:.0f} min)")


if __name__ == "__main__":
    main()
