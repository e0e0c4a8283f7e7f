"""The HTTP shipper against a local receiver standing in for Logstash's http input: an outage
under load loses nothing, duplicates nothing, keeps order; bounds drop the oldest, counted."""

from __future__ import annotations

import json
import logging
import ssl
import time
from pathlib import Path

import pytest

from celery_obs.log_shipping.hooks import LogConfig
from celery_obs.log_shipping.outputs import make_shipping_handler
from celery_obs.log_shipping.shipper import ShippingHandler
from celery_obs.log_shipping.sinks import HttpSink, TcpSink
from celery_obs.log_shipping.spool import Spool

from log_receivers import HttpReceiver, TcpReceiver, logger_with
from support import free_port, wait_for


def shipping_logger(url: str, spool: Path, **options) -> tuple[logging.Logger, ShippingHandler]:
    handler = ShippingHandler(
        HttpSink(url, timeout=2), str(spool), flush_interval=0.05, backoff_cap=0.2, **options
    )
    logger = logger_with(handler)
    return logger, handler


def numbers(records: list[dict]) -> list[int]:
    return [int(r["message"]) for r in records if r["message"].isdigit()]


def spooled_lines(root: Path) -> int:
    return sum(len(f.read_bytes().splitlines()) for f in root.rglob("*.ndjson"))


def test_an_outage_under_load_loses_nothing_and_keeps_order(receiver, tmp_path) -> None:
    url = f"http://shipper:s3cret@127.0.0.1:{receiver.port}/"
    logger, handler = shipping_logger(url, tmp_path / "spool")
    for i in range(2000):
        logger.info("%d", i)
    wait_for(lambda: len(receiver.records) == 2000, 20, "the first 2000 records")

    receiver.stop()  # Logstash goes away while the logging goes on
    for i in range(2000, 6000):
        logger.info("%d", i)
    wait_for(lambda: handler.spooled > 0, 20, "spooling")
    receiver.start()
    for i in range(6000, 8000):
        logger.info("%d", i)
    wait_for(lambda: len(receiver.records) >= 8000, 30, "every record after the outage")
    handler.close()
    assert numbers(receiver.records) == list(range(8000))  # exactly once, in order
    assert handler.dropped == 0
    assert receiver.auth[0] == "Basic c2hpcHBlcjpzM2NyZXQ="


def test_emit_never_waits_for_the_sink(tmp_path) -> None:
    dead = f"http://127.0.0.1:{free_port()}/"  # nothing listens
    logger, handler = shipping_logger(dead, tmp_path / "spool", max_queue=100)
    started = time.monotonic()
    for i in range(5000):
        logger.info("%d", i)  # returns at once: the queue goes to the spool, not the sink
    assert time.monotonic() - started < 5  # about 10 us a call; a sink's wait would be 2 s
    handler.close()
    assert spooled_lines(tmp_path / "spool") + handler.dropped == 5000


def test_close_spills_to_disk_and_the_next_start_sends_it(receiver, tmp_path) -> None:
    spool_dir = tmp_path / "spool"
    receiver.stop()
    logger, handler = shipping_logger(f"http://127.0.0.1:{receiver.port}/", spool_dir)
    for i in range(300):
        logger.info("%d", i)
    handler.close()  # the sink is down: everything goes to the spool
    assert sum(1 for _ in spool_dir.rglob("*.ndjson")) > 0
    receiver.start()
    logger, handler = shipping_logger(f"http://127.0.0.1:{receiver.port}/", spool_dir)
    # The earlier process is gone (same pid here, so its spool is this one's own).
    logger.info("300")
    wait_for(lambda: len(receiver.records) >= 301, 20, "the spooled records resent")
    handler.close()
    assert numbers(receiver.records) == list(range(301))


def test_the_spool_keeps_the_newest_and_counts_what_it_dropped(tmp_path) -> None:
    spool = Spool(tmp_path, max_bytes=1000)
    for i in range(100):
        spool.push([json.dumps({"n": i}).encode()])
    kept = []
    while (batch := spool.peek()) is not None:
        kept += [json.loads(line)["n"] for line in batch]
        spool.pop()
    assert kept == list(range(100 - len(kept), 100))
    assert spool.dropped_lines == 100 - len(kept)
    assert spool.size == 0


def test_bad_urls_are_refused() -> None:
    with pytest.raises(ValueError, match="http"):
        HttpSink("tcp://logstash:5000")


def test_tcp_json_lines_reconnects_after_a_logstash_restart(tmp_path) -> None:
    receiver = TcpReceiver(free_port())
    receiver.start()
    handler = ShippingHandler(
        TcpSink(f"tcp://127.0.0.1:{receiver.port}"),
        str(tmp_path),
        flush_interval=0.05,
        backoff_cap=0.2,
    )
    logger = logger_with(handler)
    try:
        for i in range(1000):
            logger.info("%d", i)
        wait_for(lambda: len(receiver.records) == 1000, 20, "the first 1000 lines")
        receiver.stop()  # a clean Logstash restart: the sink sees the close and reconnects
        for i in range(1000, 2000):
            logger.info("%d", i)
        wait_for(lambda: len(list(tmp_path.rglob("*.ndjson"))) > 0, 20, "spooling")
        receiver.start()
        for i in range(2000, 3000):
            logger.info("%d", i)
        wait_for(lambda: len(receiver.records) >= 3000, 30, "every line after the restart")
    finally:
        handler.close()
        receiver.stop()
    assert numbers(receiver.records) == list(range(3000))
    with pytest.raises(ValueError, match="tcp://host:port"):
        TcpSink("tcp://logstash")


class FlakySink:
    """Fails its first `failures` sends with a bug (not a SinkError), logging as it goes, the
    way the Elasticsearch client logs every request through `logging`."""

    def __init__(self, failures: int) -> None:
        self.logger = logging.getLogger("ship.flaky")  # replaced by the logger under test
        self.failures = failures
        self.sends = 0
        self.lines: list[bytes] = []

    def send(self, lines: list[bytes]) -> None:
        self.sends += 1
        self.logger.info("POST /_bulk")  # must not come back to the shipper: it would loop
        if self.sends <= self.failures:
            raise RuntimeError("sink bug")
        self.lines += lines

    def close(self) -> None:
        pass


def test_a_failing_sink_is_reported_once_and_its_own_logging_never_loops(tmp_path) -> None:
    sink = FlakySink(failures=3)
    handler = ShippingHandler(sink, str(tmp_path), flush_interval=0.05, backoff_cap=0.05)
    logger = sink.logger = logger_with(handler)
    said: list[str] = []
    status = logging.getLogger("celery_obs.log_shipping")
    status.addHandler(seen := logging.Handler())
    seen.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    try:
        for i in range(100):
            logger.info("%d", i)
        wait_for(lambda: len(sink.lines) >= 100, 20, "every line after the sink recovered")
        handler.close()
    finally:
        status.removeHandler(seen)
    assert numbers([json.loads(line) for line in sink.lines]) == list(range(100))
    assert [m.split(" (")[0] for m in said] == ["log shipping failing", "log shipping recovered"]
    assert "RuntimeError: sink bug" in said[1]
    assert not [line for line in sink.lines if b"POST /_bulk" in line]  # never fed back


def server_tls(certificate) -> ssl.SSLContext:
    cert, key = certificate
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


@pytest.mark.parametrize("scheme", ["https", "tls"])
def test_tls_outputs_verify_the_server_and_send_credentials(certificate, scheme, tmp_path) -> None:
    receiver = (HttpReceiver if scheme == "https" else TcpReceiver)(
        free_port(), tls=server_tls(certificate)
    )
    receiver.start()
    config = LogConfig(
        ca_certs=str(certificate[0]),
        username="shipper",
        password="s3cret",
        spool_dir=str(tmp_path),
        flush_interval=0.05,
    )
    spec = f"{scheme}://127.0.0.1:{receiver.port}/"
    handler = make_shipping_handler(spec, config)
    logger = logger_with(handler)
    try:
        for batch in range(5):  # five batches, one connection
            for i in range(batch * 10, batch * 10 + 10):
                logger.info("%d", i)
            total = batch * 10 + 10
            wait_for(lambda total=total: len(receiver.records) == total, 20, "records over TLS")
        if scheme == "tls":
            # A TLS 1.3 session ticket makes the socket readable: not a closed peer.
            assert len(receiver.connections) == 1
    finally:
        handler.close()
        receiver.stop()
    assert numbers(receiver.records) == list(range(50))
    if scheme == "https":
        assert set(receiver.auth) == {"Basic c2hpcHBlcjpzM2NyZXQ="}


def test_an_untrusted_certificate_is_refused_and_the_records_kept(certificate, tmp_path) -> None:
    receiver = HttpReceiver(free_port(), tls=server_tls(certificate))
    receiver.start()
    config = LogConfig(spool_dir=str(tmp_path), flush_interval=0.05)  # system CAs only
    handler = make_shipping_handler(f"https://127.0.0.1:{receiver.port}/", config)
    logger = logger_with(handler)
    try:
        logger.info("0")
        wait_for(lambda: handler.last_error is not None, 20, "the TLS failure")
        assert "CERTIFICATE_VERIFY_FAILED" in handler.last_error
    finally:
        handler.close()
        receiver.stop()
    assert receiver.records == []
    assert sum(len(f.read_text().splitlines()) for f in tmp_path.rglob("*.ndjson")) == 1


def test_a_kept_alive_connection_closed_while_idle_is_replaced_at_once() -> None:
    receiver = HttpReceiver(free_port(), keep_alive=True)
    receiver.start()
    sink = HttpSink(f"http://127.0.0.1:{receiver.port}/", timeout=2)
    try:
        sink.send([b'{"message": "0"}'])
        receiver.drop_idle_connections()  # Logstash's idle timeout, between two batches
        sink.send([b'{"message": "1"}'])  # no SinkError: a stale connection is not an outage
    finally:
        sink.close()
        receiver.stop()
    assert numbers(receiver.records) == [0, 1]
    assert receiver.requests == 2
