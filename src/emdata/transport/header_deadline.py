"""A deadline for a response's status line and headers as a whole.

requests and urllib3 have only per-read timeouts: a server that sends its headers a byte at a time
never trips one, so a fetch waits for as long as the server likes. Connections made through
:class:`HeaderDeadlineAdapter` start a timer when they wait for a response; when the headers are
not complete in time the timer shuts the socket down, and the wait fails as a read timeout, which
the HTTP client retries like any other. (Bodies have their own bound: the minimum transfer rate.)
"""

from __future__ import annotations

import socket
import threading
from typing import Any

import requests.adapters
import urllib3.connection
import urllib3.connectionpool
from urllib3.exceptions import ReadTimeoutError


class _Deadline:
    """Mixed into urllib3's connections: ``getresponse`` (status line and headers) within ``header_deadline`` s."""

    header_deadline: float = 60.0
    sock: Any

    def getresponse(self, *args: Any, **kwargs: Any) -> Any:
        sock, fired = self.sock, threading.Event()

        def expire() -> None:
            fired.set()
            try:
                sock.shutdown(socket.SHUT_RDWR)  # the blocked read returns at once
            except OSError:
                pass

        timer = threading.Timer(self.header_deadline, expire)
        timer.daemon = True
        timer.start()
        try:
            response = super().getresponse(*args, **kwargs)  # type: ignore[misc]
        except Exception as exc:
            if fired.is_set():
                raise self._late() from exc
            raise
        finally:
            timer.cancel()
        if fired.is_set():  # the shutdown ended the headers early: what was parsed is not the response
            response.close()
            raise self._late()
        return response

    def _late(self) -> ReadTimeoutError:
        return ReadTimeoutError(None, "", f"response headers not complete within {self.header_deadline:g} s "  # type: ignore[arg-type]
                                "(read timeout)")


class HeaderDeadlineAdapter(requests.adapters.HTTPAdapter):
    """An HTTP adapter whose connections give a server ``deadline`` seconds for all of its headers."""

    def __init__(self, deadline: float, **kwargs: Any) -> None:
        attrs = {"header_deadline": float(deadline)}
        http = type("DeadlineHTTPConnection", (_Deadline, urllib3.connection.HTTPConnection), attrs)
        https = type("DeadlineHTTPSConnection", (_Deadline, urllib3.connection.HTTPSConnection), attrs)
        self._pools = {
            "http": type("DeadlineHTTPPool", (urllib3.connectionpool.HTTPConnectionPool,), {"ConnectionCls": http}),
            "https": type("DeadlineHTTPSPool", (urllib3.connectionpool.HTTPSConnectionPool,), {"ConnectionCls": https}),
        }
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = self._pools
