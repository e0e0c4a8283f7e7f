"""A TCP proxy on 127.0.0.1 that can stall, cut and reset the connections through it: a broker
link failing the ways real networks fail, under a real client and a real broker."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

from support import free_port


class TcpProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._flowing = threading.Event()
        self._flowing.set()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def url_for(self, url: str) -> str:
        """`url` with the target's port replaced by the proxy's."""
        return url.replace(f":{self.target[1]}/", f":{self.port}/", 1)

    def stall(self) -> None:
        """Stop moving bytes both ways; the connections stay open (a black-holed link)."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def cut(self, reset: bool = False) -> None:
        """Close every connection through the proxy: a FIN, or an RST when `reset`."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            if reset:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with contextlib.suppress(OSError):
                sock.close()

    def close(self) -> None:
        self._closed = True
        self._flowing.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        self.cut()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                self._flowing.wait()
                data = source.recv(65536)
                if not data:
                    break
                self._flowing.wait()  # a stall that began while we waited in recv holds this too
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
