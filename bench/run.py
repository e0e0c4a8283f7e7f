"""Benchmark driver: the exporter against a bare Celery Receiver, on the same synthetic workload.

Scenarios (each subject runs as its own process, fed the same messages):
  drain    subject paused with SIGSTOP while the whole workload is published, then resumed:
           how fast does it drain the backlog? (Redis: a private server whose pub/sub output
           buffer is unlimited, so the backlog can exist at all.)
  live     subject running while the workload is published at --rate messages/s (0: full speed):
           does it lose anything?
  burst    Redis with the server's default client-output-buffer-limit for pub/sub, workload
           published at full speed: does the server cut the subscriber off?
  restart  live on a private Redis that is restarted halfway: the exporter must count a
           reconnect and every event published while the server was up.

Reports per subject: events counted vs published per type, drain time and events/s, CPU seconds,
peak RSS, and for the exporter /metrics latency and size; then our ratio to the Receiver.

  python bench/run.py drain --tasks 50000 --batch 1
  python bench/run.py burst --tasks 50000 --batch 24 --subjects exporter --timeline

`--timeline` samples the exporter every 25 ms from the first message published (resident memory,
Redis backlog, events counted) and prints where its memory peak comes from; the scrapes it takes
cost the exporter CPU, so do not read its CPU figure from such a run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import eventgen
from bare_receiver import PROBE_HOST

ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mb(pid: int, key: str = "VmHWM") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


class RedisServer:
    """A private redis-server; `default_limits` keeps the pub/sub output buffer limit as shipped."""

    def __init__(self, default_limits: bool) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="bench-redis-")
        self.args = [
            shutil.which("redis-server") or "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self.dir,
        ]
        if not default_limits:
            self.args += ["--client-output-buffer-limit", "pubsub 0 0 0"]
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if b"Ready to accept connections" in line:
                break
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Subject:
    name = ""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     cwd=ROOT, text=True)  # fmt: skip

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class ReceiverSubject(Subject):
    name = "celery Receiver (count only)"

    def __init__(self, url: str, expect: int, idle: float) -> None:
        super().__init__(
            [
                sys.executable,
                str(ROOT / "bench" / "bare_receiver.py"),
                "--broker-url",
                url,
                "--expect",
                str(expect),
                "--idle",
                str(idle),
            ]
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def ready(self) -> bool:
        return "ready" in self.lines

    def baseline(self) -> Counter:
        return Counter()

    def result(self, timeout: float) -> tuple[Counter, float]:
        self.proc.wait(timeout)
        self._reader.join(5)
        data = json.loads(self.lines[-1])
        return Counter(data["counts"]), data["last"]


class ExporterSubject(Subject):
    name = "celery-obs exporter"

    def __init__(self, url: str, extra: list[str]) -> None:
        self.url = url
        self.port = free_port()
        super().__init__([sys.executable, "-m", "celery_obs", "exporter", "--broker-url", url,
                          "--web.listen-address", f"127.0.0.1:{self.port}",
                          "--no-enable-events", "--queue-poll-interval", "3600",
                          "--log-level", "warning", *extra])  # fmt: skip

    def scrape(self) -> str:
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.read().decode()

    def samples(self, prefix: str, text: str | None = None) -> dict[str, float]:
        out = {}
        for line in (self.scrape() if text is None else text).splitlines():
            if line.startswith(prefix):
                key, value = line.rsplit(" ", 1)
                out[key] = float(value)
        return out

    def ready(self) -> bool:
        try:
            return any(PROBE_HOST in k for k in self.samples("celery_worker_up"))
        except OSError:
            return False

    def baseline(self, text: str | None = None) -> Counter:
        counts: Counter = Counter()
        for key, value in self.samples("celery_exporter_events_total", text).items():
            counts[key.split('type="')[1].split('"')[0]] = int(value)
        return counts

    def progress(self) -> tuple[Counter, float]:
        text = self.scrape()  # one scrape: each costs the exporter CPU the run is billed for
        last = self.samples("celery_exporter_last_event_timestamp_seconds", text)
        return self.baseline(text), next(iter(last.values()), 0.0)

    def scrape_stats(self, times: int = 20) -> tuple[float, int]:
        took, size = [], 0
        for _ in range(times):
            started = time.perf_counter()
            size = len(self.scrape().encode())
            took.append((time.perf_counter() - started) * 1000)
        return statistics.median(took), size


class Timeline:
    """The exporter sampled every 25 ms in a thread: seconds since publishing began, resident
    MB, Redis backlog MB, events counted. Scrapes, so it costs the exporter CPU."""

    def __init__(self, subject: ExporterSubject, base: Counter) -> None:
        self.subject, self.base = subject, base
        self.samples: list[tuple[float, float, float, int]] = []
        self.published_at = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._start = time.monotonic()
        self._thread.start()

    def published(self) -> None:
        self.published_at = time.monotonic() - self._start

    def _sample(self) -> None:
        pid = self.subject.proc.pid
        while not self._stop.wait(0.025):  # the sampling period, not a wait for a condition
            try:
                text = self.subject.scrape()
            except OSError:
                continue
            backlog = self.subject.samples("celery_exporter_backlog_bytes", text)
            counted = sum((self.subject.baseline(text) - self.base).values())
            self.samples.append((time.monotonic() - self._start, rss_mb(pid, "VmRSS"),
                                 sum(backlog.values()) / 2**20, counted))  # fmt: skip

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join(5)
        lines = [f"    timeline (publishing ended at {self.published_at:.2f}s):",
                 "         s   RSS MB  backlog MB    counted"]  # fmt: skip
        # At most ~40 rows: every sample around the peak, evenly spaced ones elsewhere.
        peak = max(range(len(self.samples)), key=lambda i: self.samples[i][1], default=0)
        step = max(len(self.samples) // 30, 1)
        for i, (at, rss, backlog, counted) in enumerate(self.samples):
            if i % step == 0 or abs(i - peak) <= 3 or i == len(self.samples) - 1:
                lines.append(f"    {at:6.2f} {rss:8.0f} {backlog:11.1f} {counted:10,}")
        return lines


def wait_ready(subject: Subject, url: str, timeout: float = 60, ready=None) -> None:
    probe = eventgen.Workload(tasks=0)
    # worker-online: a type the workload never sends, so probes never mix with its counts.
    probe.events = [{"type": "worker-online", "hostname": PROBE_HOST, "timestamp": time.time(),
                     "utcoffset": 0, "freq": 2.0, "active": 0, "processed": 0}]  # fmt: skip
    wire = eventgen.encode_for(url, probe)
    publisher = eventgen.publisher_for(url)
    deadline = time.monotonic() + timeout
    ready = ready or subject.ready
    while not ready():
        if subject.proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{subject.name} did not become ready")
        publisher.publish(wire)
        time.sleep(0.2)  # probe pacing while the subject subscribes, not a measured wait
    time.sleep(0.5)  # let in-flight probes land before the baseline is taken


def run_subject(kind: str, scenario: str, url: str, workload: eventgen.Workload, wire: list,
                args: argparse.Namespace, redis: RedisServer | None) -> dict:  # fmt: skip
    expected_total = len(workload.events)
    if kind == "receiver":
        subject: Subject = ReceiverSubject(url, expected_total, args.idle)
    else:
        subject = ExporterSubject(url, args.exporter_arg)
    try:
        wait_ready(subject, url)
        base = subject.baseline()  # type: ignore[attr-defined]
        cpu_before = cpu_seconds(subject.proc.pid)
        publisher = eventgen.publisher_for(url)
        published = Counter(workload.expected)
        timeline = (
            Timeline(subject, base)
            if args.timeline and isinstance(subject, ExporterSubject)
            else None
        )
        if scenario == "drain":
            subject.pause()
            publisher.publish(wire)
            resumed = time.time()
            subject.resume()
        else:
            resumed = time.time()
            if scenario == "restart":
                half = len(wire) // 2
                publisher.publish(wire[:half], args.rate)
                assert redis is not None
                redis.stop()
                redis.start()
                wait_reconnected(subject)
                publisher = eventgen.publisher_for(url)
                publisher.publish(wire[half:], args.rate)
            else:
                publisher.publish(wire, args.rate)
        if timeline is not None:
            timeline.published()
        rss_samples: list[float] = []
        if kind == "receiver":
            counts, last = subject.result(timeout=args.timeout)  # type: ignore[attr-defined]
            cpu = None
            peak = None
        else:
            counts, last = wait_exporter(subject, base, expected_total, args, rss_samples)
            cpu = cpu_seconds(subject.proc.pid) - cpu_before
            peak = rss_mb(subject.proc.pid)
        got = counts - base
        result = {
            "subject": subject.name,
            "published": sum(published.values()),
            "counted": sum(got[t] for t in published),
            "lost": {t: published[t] - got[t] for t in published if published[t] != got[t]},
            "seconds": max(last - resumed, 1e-9),
            "cpu": cpu,
            "peak_rss_mb": peak,
            "rss_samples": rss_samples,
        }
        if timeline is not None:
            result["timeline"] = timeline.stop()
        if kind == "exporter":
            result["scrape_ms"], result["scrape_bytes"] = subject.scrape_stats()  # type: ignore[attr-defined]
            result["reconnects"] = subject.samples("celery_exporter_broker_reconnects_total")  # type: ignore[attr-defined]
        return result
    finally:
        subject.close()


def wait_reconnected(subject: Subject, timeout: float = 60) -> None:
    """Events published before the subscriber is back are lost by pub/sub design: wait."""
    if not isinstance(subject, ExporterSubject):
        raise SystemExit("the restart scenario needs --subjects exporter")
    deadline = time.monotonic() + timeout
    while subject.samples("celery_exporter_broker_connected") != {
        "celery_exporter_broker_connected": 1.0
    }:
        if time.monotonic() > deadline:
            raise SystemExit("the exporter did not reconnect")
        time.sleep(0.1)  # polling interval
    # Connected is not yet subscribed: probe until a probe heartbeat is counted again.
    before = subject.baseline()["worker-online"]
    wait_ready(subject, subject.url, ready=lambda: subject.baseline()["worker-online"] > before)


def wait_exporter(subject: ExporterSubject, base: Counter, expected: int,
                  args: argparse.Namespace, rss: list[float]) -> tuple[Counter, float]:  # fmt: skip
    """After publishing (which the caller waits for), scrape once a second until all events
    are counted, or none came for --idle seconds. The exporter is not scraped while events
    flow, so the CPU billed is the stream's plus these few scrapes."""
    last_total, last_change = -1, time.monotonic()
    while True:
        counts, last_event = subject.progress()
        rss.append(rss_mb(subject.proc.pid, "VmRSS"))
        total = sum((counts - base).values())
        if total >= expected:
            return counts, last_event
        if total != last_total:
            last_total, last_change = total, time.monotonic()
        elif time.monotonic() - last_change > args.idle:
            return counts, last_event
        time.sleep(1.0)  # progress polling interval (the end time comes from the exporter)


def report(results: list[dict], workload: eventgen.Workload, scenario: str) -> None:
    print(
        f"\n{scenario}: {len(workload.events):,} events, {workload.tasks:,} tasks, "
        f"{workload.workers} workers, {workload.names} names, batch {workload.batch}"
    )
    for r in results:
        rate = r["counted"] / r["seconds"]
        line = (
            f"  {r['subject']:<30} {r['counted']:>9,}/{r['published']:,} events  "
            f"{r['seconds']:7.2f}s  {rate:>9,.0f} events/s"
        )
        if r["cpu"] is not None:
            line += f"  cpu {r['cpu']:.2f}s  peak RSS {r['peak_rss_mb']:.0f} MB"
            line += f"  scrape {r['scrape_ms']:.1f} ms / {r['scrape_bytes'] / 1024:.0f} kB"
            if r["reconnects"]:
                line += f"  reconnects {int(next(iter(r['reconnects'].values())))}"
        print(line)
        if r["lost"]:
            print(f"    lost: {r['lost']}")
        if r["rss_samples"] and len(r["rss_samples"]) >= 4:
            s = r["rss_samples"]
            print(
                f"    RSS during run: {s[len(s) // 4]:.0f} / {s[len(s) // 2]:.0f} / "
                f"{s[3 * len(s) // 4]:.0f} / {s[-1]:.0f} MB (quartiles, last)"
            )
        for line in r.get("timeline", []):
            print(line)
    by = {r["subject"]: r for r in results}
    if len(by) == 2:
        ours, theirs = by[ExporterSubject.name], by[ReceiverSubject.name]
        ratio = (ours["counted"] / ours["seconds"]) / (theirs["counted"] / theirs["seconds"])
        print(f"  exporter / Receiver drain ratio: {ratio:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("scenario", choices=["drain", "live", "burst", "restart"])
    parser.add_argument("--broker", choices=["redis", "amqp"], default="redis")
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672//")
    parser.add_argument("--subjects", default="receiver,exporter")
    parser.add_argument("--rate", type=float, default=0, help="live: messages/s (0: full speed)")
    parser.add_argument(
        "--idle", type=float, default=10.0, help="give up after this long without progress"
    )
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--exporter-arg", action="append", default=[], help="extra exporter flag")
    parser.add_argument(
        "--timeline",
        action="store_true",
        help="exporter: sample memory, backlog and progress every 25 ms and print them",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON (table.py)")
    eventgen.add_workload_arguments(parser)
    args = parser.parse_args()

    workload = eventgen.workload_from(args)
    redis = None
    if args.broker == "redis":
        redis = RedisServer(default_limits=args.scenario == "burst")
        url = redis.url
    else:
        url = args.amqp_url
    try:
        wire = eventgen.encode_for(url, workload)
        results = [run_subject(kind, args.scenario, url, workload, wire, args, redis)
                   for kind in args.subjects.split(",")]  # fmt: skip
    finally:
        if redis is not None:
            redis.close()
    report(results, workload, args.scenario)
    if args.json:
        Path(args.json).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
