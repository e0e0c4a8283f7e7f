"""Read-only filesystems, as hardened containers run: no usable temporary directory at all (a
mount namespace with read-only /tmp and /var/tmp), a spool directory on a read-only mount, and
one the user may not write (mode 0500, root without CAP_DAC_OVERRIDE). Importing and installing
must work, say once on stderr that records wait in memory, and ship every record."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from celery_obs.log_shipping.hooks import JsonLogging, LogConfig

from log_receivers import logger_with
from support import TESTS

ROOT = TESTS.parent
#: Coverage's subprocess patch (scripts/test) is left out: these children run on a read-only
#: filesystem where coverage cannot write its data file, and its complaint would garble the
#: output the tests read.
ENV = {
    **{k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_")},
    "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]),
    "TMPDIR": "/nonexistent-tmp",
    "TEMP": "/nonexistent-tmp",
    "TMP": "/nonexistent-tmp",
}

#: Run a command where /tmp and /var/tmp are read-only (and the working directory too): no
#: temporary directory is usable. They are bound read-only onto themselves, not hidden, so a
#: checkout under /tmp (CI clones there) stays importable. The mounts live and die with the
#: namespace.
NO_TEMP_DIR = [
    "unshare",
    "--mount",
    "--propagation",
    "private",
    "sh",
    "-c",
    "for d in /tmp /var/tmp; do mount --bind $d $d && mount -o remount,bind,ro $d || exit 1; "
    'done && cd /tmp && exec "$@"',
    "sh",
]

SHIP = textwrap.dedent(
    """
    import logging, sys, tempfile
    from celery import signals
    try:
        tempfile.gettempdir()
        print("a temporary directory is usable")
    except FileNotFoundError:
        print("no temporary directory")
    from celery_obs import log_shipping
    log_shipping.install(None, output=sys.argv[1])
    logger = logging.getLogger("app")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    signals.after_setup_logger.send(sender=None, logger=logger)  # as Celery does at start
    for i in range(100):
        logger.info("%d", i)
    signals.worker_shutdown.send(sender=None)  # flush, as at the worker's exit
    print("done")
    """
)


def numbers(records: list[dict]) -> list[int]:
    return [int(r["message"]) for r in records if r["message"].isdigit()]


def can_run(command: list[str]) -> bool:
    if shutil.which(command[0]) is None:
        return False
    return subprocess.run([*command, "true"], capture_output=True).returncode == 0


def stderr_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "read-only"
    directory.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(directory)],
        capture_output=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs ({mounted.stderr.decode().strip()})")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def test_importing_and_installing_needs_no_temporary_directory() -> None:
    if not can_run(NO_TEMP_DIR):
        pytest.skip("needs root and `unshare --mount` to make /tmp read-only")
    script = (
        "import tempfile\n"
        "try:\n    tempfile.gettempdir(); print('a temporary directory is usable')\n"
        "except FileNotFoundError:\n    print('no temporary directory')\n"
        "from celery_obs import log_shipping\n"
        "log_shipping.install(None, output='stdout')\n"
        "print('installed')\n"
    )
    result = subprocess.run(
        [*NO_TEMP_DIR, sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
    )
    assert result.stdout.splitlines() == ["no temporary directory", "installed"], result.stderr
    assert result.stderr == ""  # stdout only: no spool needed, nothing to say


def test_without_a_temporary_directory_network_outputs_spool_in_memory(receiver) -> None:
    if not can_run(NO_TEMP_DIR):
        pytest.skip("needs root and `unshare --mount` to make /tmp read-only")
    # Two outputs, one problem: said once.
    outputs = f"http://127.0.0.1:{receiver.port}/,http://127.0.0.1:{receiver.port}/copy"
    result = subprocess.run(
        [*NO_TEMP_DIR, sys.executable, "-c", SHIP, outputs],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
    )
    assert result.stdout.splitlines() == ["no temporary directory", "done"], result.stderr
    [said] = stderr_lines(result.stderr)
    assert said["log.level"] == "warning"
    assert "no usable temporary directory" in said["message"]
    assert "memory" in said["message"]
    assert sorted(numbers(receiver.records)) == sorted([*range(100), *range(100)])


def test_a_spool_directory_on_a_read_only_mount_falls_back_to_memory(
    receiver, read_only_dir, capfd
) -> None:
    config = LogConfig(
        output=f"http://127.0.0.1:{receiver.port}/",
        spool_dir=str(read_only_dir / "spool"),
        flush_interval=0.05,
    )
    json_logging = JsonLogging(config)  # what install() builds: it must not raise
    [shipper] = json_logging.shippers
    logger = logger_with(shipper)
    for i in range(100):
        logger.info("%d", i)
    json_logging.flush_shippers()
    assert numbers(receiver.records) == list(range(100))
    [said] = stderr_lines(capfd.readouterr().err)
    assert str(read_only_dir) in said["message"]
    assert "Read-only file system" in said["message"]
    assert "memory" in said["message"]
    assert not (read_only_dir / "spool").exists()


def test_a_spool_directory_the_user_may_not_write_falls_back_to_memory(receiver, tmp_path) -> None:
    drop_override = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    if os.geteuid() != 0 or not can_run(drop_override):
        pytest.skip("needs root and setpriv to drop CAP_DAC_OVERRIDE")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = subprocess.run(
            [*drop_override, sys.executable, "-c", SHIP, f"http://127.0.0.1:{receiver.port}/"],
            capture_output=True,
            text=True,
            env={**ENV, "TMPDIR": "/tmp", "CELERY_OBS_LOG_SPOOL_DIR": str(locked / "spool")},
            timeout=60,
        )
    finally:
        locked.chmod(0o700)
    assert result.stdout.splitlines()[-1] == "done", result.stderr
    [said] = stderr_lines(result.stderr)
    assert "Permission denied" in said["message"]
    assert "memory" in said["message"]
    assert numbers(receiver.records) == list(range(100))
    assert not (locked / "spool").exists()
