"""A TCP relay that loses some connections: for fault tests of keyward's cluster probes.

`LossyRelay(upstream, lose=lambda n: n % 5 == 1)` listens on a free loopback port and relays
every connection to `upstream` ('host:port'), except those whose number (1, 2, ... in accept
order) `lose` picks: those are accepted and then blackholed, their bytes read and dropped and
nothing ever answered, as a network that loses a request does. keyward's probes open a new
connection to the bootstrap for every probe, so in front of a cluster's bootstrap this loses
exactly the probes it picks. `active = False` stops losing; `accepted` and `lost` count.
"""

from __future__ import annotations

import socket
import threading
from typing import Callable


class LossyRelay:
    def __init__(self, upstream: str, lose: Callable[[int], bool]) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.lose = lose
        self.active = True
        self.accepted = 0
        self.lost = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="lossy-accept").start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                self.accepted += 1
                n = self.accepted
                lose = self.active and self.lose(n)
                if lose:
                    self.lost += 1
                self._sockets.append(conn)
            if lose:
                threading.Thread(target=self._drain, args=(conn,), daemon=True).start()
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
                upstream.settimeout(None)
            except OSError:
                conn.close()
                continue
            with self._lock:
                self._sockets.append(upstream)
            threading.Thread(target=self._pump, args=(conn, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, conn), daemon=True).start()

    @staticmethod
    def _drain(conn: socket.socket) -> None:
        try:
            while conn.recv(65536):
                pass
        except OSError:
            pass

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                try:
                    s.close()
                except OSError:
                    pass
            self._sockets.clear()

    def __enter__(self) -> "LossyRelay":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
