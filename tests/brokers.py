"""Broker resources the tests create and remove themselves: a private redis-server on a free
port, and a RabbitMQ vhost with a user of its own.

Nothing here touches a resource it did not create: the machine's Redis on 6379 and its RabbitMQ
users and vhosts are shared with other work (a FLUSHDB there is someone else's data loss).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import uuid

from support import Process, free_port, wait_for


class RedisServer:
    """A `redis-server` of our own: no persistence, loopback only, its files in a temp dir."""

    def __init__(
        self, *extra_args: str, port: int | None = None, tls: tuple[str, str] | None = None
    ) -> None:
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="celery-obs-redis-")
        self.extra_args = extra_args
        if tls is not None:  # TLS only, on the same port: (certificate, key), no client certs
            cert, key = tls
            self.extra_args += (
                *("--tls-port", str(self.port), "--port", "0"),
                *("--tls-cert-file", cert, "--tls-key-file", key, "--tls-ca-cert-file", cert),
                *("--tls-auth-clients", "no"),
            )
        self.process: Process | None = None
        self.start()

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (Debian: apt-get install redis)")
        self.process = Process(
            [
                binary,
                *("--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", self.dir),
                *self.extra_args,
            ]
        )
        process = self.process

        def ready() -> bool:
            if process.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited:\n{process.output()}")
            return "Ready to accept connections" in process.output()

        wait_for(ready, 10, "redis-server ready")

    def kill(self) -> None:
        """Stop the server the hard way (SIGKILL), as a crash would."""
        if self.process is not None:
            self.process.signal(signal.SIGKILL)
            self.process.wait(5)
            self.process.close()
            self.process = None

    def close(self) -> None:
        if self.process is not None:
            self.process.close()
            self.process = None
        shutil.rmtree(self.dir, ignore_errors=True)


class RabbitVhost:
    """A vhost and a user made for one test session, both removed by `close()`.

    The user's name is unique too, so two sessions on one RabbitMQ never share or delete each
    other's account; `guest` is given the vhost as well for tools that connect as guest.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 5672) -> None:
        ctl = shutil.which("rabbitmqctl")
        if ctl is None:
            raise RuntimeError("rabbitmqctl is needed to create a test vhost and user")
        self.ctl = ctl
        tag = uuid.uuid4().hex[:8]
        self.name = f"celery-obs-test-{tag}"
        self.user = f"celery-obs-test-{tag}"
        self.password = f"s3cret-{uuid.uuid4().hex[:12]}"
        self.host, self.port = host, port
        self._run("add_vhost", self.name)
        self._run("add_user", self.user, self.password)
        for user in (self.user, "guest"):
            self._run("set_permissions", "-p", self.name, user, ".*", ".*", ".*")

    def url(self, user: str | None = None, password: str | None = None) -> str:
        user = user or self.user
        password = self.password if password is None else password
        return f"amqp://{user}:{password}@{self.host}:{self.port}/{self.name}"

    def _run(self, *args: str) -> None:
        subprocess.run([self.ctl, *args], check=True, capture_output=True, timeout=60)

    def close(self) -> None:
        for args in (("delete_vhost", self.name), ("delete_user", self.user)):
            subprocess.run([self.ctl, *args], capture_output=True, timeout=60)
