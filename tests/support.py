"""Helpers for the real-component tests: processes, scrapes, polling with deadlines."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

TESTS = Path(__file__).resolve().parent
#: The repository (the asset folders, docs, the Dockerfile ...).
ROOT = TESTS.parent
T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 30.0,
    what: str = "condition",
    interval: float = 0.1,
) -> T:
    """Poll `predicate` until it is truthy; at the deadline fail showing its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {value!r}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Scrape:
    """One parsed /metrics response."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[str, dict[frozenset, float]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                series = self.samples.setdefault(sample.name, {})
                series[frozenset(sample.labels.items())] = sample.value

    def value(self, metric: str, /, **labels: str) -> float | None:
        return self.samples.get(metric, {}).get(frozenset(labels.items()))

    def series(self, name: str, *label_names: str) -> dict[tuple[str, ...], float]:
        """{label values in the given order: value} for one metric."""
        return {
            tuple(dict(labels)[n] for n in label_names): value
            for labels, value in self.samples.get(name, {}).items()
        }


def http_get(
    url: str,
    headers: dict[str, str] | None = None,
    context: ssl.SSLContext | None = None,
    timeout: float = 5.0,
) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


class Process:
    """A child process whose output goes to a temp file, stopped on close."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        split_stderr: bool = False,
    ) -> None:
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives as long as the process
            prefix="celery-obs-test-", suffix=".log", delete=False
        )
        #: With split_stderr, stderr goes here (`errors()`), and `output()` is stdout alone.
        self.err = (
            tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives as long as the process
                prefix="celery-obs-test-", suffix=".err", delete=False
            )
            if split_stderr
            else None
        )
        self.args = args
        self.proc = subprocess.Popen(
            args,
            stdout=self.log,
            stderr=self.err if self.err is not None else subprocess.STDOUT,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def errors(self) -> str:
        assert self.err is not None, "started without split_stderr"
        return Path(self.err.name).read_text(errors="replace")

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signum)

    def wait(self, timeout: float = 20.0) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(5)
        for log in (self.log, self.err):
            if log is not None and not log.closed:  # close() may be called again
                log.close()
                os.unlink(log.name)


class ExporterProcess(Process):
    def __init__(self, broker_url: str, *flags: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        super().__init__(
            [
                sys.executable,
                "-m",
                "celery_obs",
                "exporter",
                "--broker-url",
                broker_url,
                "--web.listen-address",
                f"127.0.0.1:{self.port}",
                *flags,
            ],
            env=env,
        )

    def scrape(self) -> Scrape:
        status, body = http_get(f"{self.base}/metrics")
        assert status == 200, body
        return Scrape(body)

    def healthz(self) -> tuple[int, str]:
        try:
            return http_get(f"{self.base}/healthz")
        except OSError as exc:  # not listening yet
            return 0, str(exc)

    def wait_healthy(self, timeout: float = 30.0) -> None:
        def healthy() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"exporter exited {self.proc.returncode}:\n{self.output()}")
            return self.healthz()[0] == 200

        wait_for(healthy, timeout, "exporter /healthz 200")

    def wait_value(
        self, metric: str, expected: float, /, timeout: float = 30.0, **labels: str
    ) -> None:
        wait_for(
            lambda: self.scrape().value(metric, **labels) == expected,
            timeout,
            f"{metric}{labels} == {expected}",
        )


class WorkerProcess(Process):
    """A real `celery worker` (prefork -c 2 unless told) running a test app (cluster_app.py).

    `queue` may name several queues (comma separated); the first is the app's default queue.
    """

    def __init__(
        self,
        broker_url: str,
        queue: str,
        name: str,
        *flags: str,
        events: bool = True,
        app: str = "cluster_app",
        env: dict[str, str] | None = None,
        quiet: bool = False,
        pool: str = "prefork",
        concurrency: int = 2,
        split_stderr: bool = False,
    ) -> None:
        self.hostname = f"{name}@{socket.gethostname()}"
        super().__init__(
            [
                sys.executable,
                "-m",
                "celery",
                *(["-q"] if quiet else []),  # no startup banner: stdout is only log lines
                "-A",
                app,
                "worker",
                "-P",
                pool,
                "-c",
                str(concurrency),
                "-Q",
                queue,
                "-n",
                self.hostname,
                "--without-mingle",
                "--without-gossip",
                "-l",
                "INFO",
                *(["-E"] if events else []),
                *flags,
            ],
            env={
                "OBS_TEST_BROKER": broker_url,
                "OBS_TEST_QUEUE": queue.split(",")[0],
                "OBS_TEST_TASK_EVENTS": "1" if events else "0",
                **(env or {}),
            },
            cwd=TESTS,
            split_stderr=split_stderr,
        )


def run_exporter_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `celery-obs exporter ARGS` to completion (for startup errors)."""
    return subprocess.run(
        [sys.executable, "-m", "celery_obs", "exporter", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


#: Producer apps made by the current test; conftest closes their connection pools after it.
PRODUCERS: list[Celery] = []


def producer(broker_url: str, queue: str) -> Celery:
    """A producer app like the user's: publishes by task name, with task-sent events."""
    app = Celery("obs_producer", broker=broker_url, set_as_current=False)
    app.conf.update(task_send_sent_event=True, task_default_queue=queue, task_ignore_result=True)
    PRODUCERS.append(app)
    return app


def send_many(
    app: Celery, calls: Iterable[tuple[str, tuple[Any, ...], dict[str, Any]]]
) -> list[str]:
    return [app.send_task(name, args, **options).id for name, args, options in calls]


def keys_lost(original: object, parsed: object, path: str = "") -> list[str]:
    """Every key or value of `original` that `parsed` does not have, by its path."""
    if isinstance(original, dict):
        if not isinstance(parsed, dict):
            return [path]
        return [
            lost
            for key, value in original.items()
            for lost in (
                [f"{path}.{key}"]
                if key not in parsed
                else keys_lost(value, parsed[key], f"{path}.{key}")
            )
        ]
    if isinstance(original, list):
        if not isinstance(parsed, list) or len(parsed) != len(original):
            return [path]
        return [
            lost
            for a, b in zip(original, parsed, strict=True)
            for lost in keys_lost(a, b, f"{path}[]")
        ]
    return [] if original == parsed else [f"{path}: {original!r} -> {parsed!r}"]
