"""Is the loopback interface usable? The demo and the replicas need 127.0.0.1 and nothing else."""

from __future__ import annotations

import socket
import threading

from emdata.errors import EmdataError

HINT = ("check that the loopback interface is up (`ip link set lo up`) and that no firewall rule "
        "blocks local connections; the demo uses nothing but 127.0.0.1")


def check_loopback(timeout: float = 2.0) -> None:
    """Bind, connect and exchange one byte on 127.0.0.1 within ``timeout`` seconds, or raise."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
            server.settimeout(timeout)
            server.bind(("127.0.0.1", 0))
            server.listen(1)
            port = server.getsockname()[1]
            accepted: list[socket.socket] = []

            def accept() -> None:
                try:
                    conn, _ = server.accept()
                    conn.sendall(b"!")
                    accepted.append(conn)
                except OSError:
                    pass

            thread = threading.Thread(target=accept, daemon=True)
            thread.start()
            with socket.create_connection(("127.0.0.1", port), timeout=timeout) as client:
                client.settimeout(timeout)
                if client.recv(1) != b"!":
                    raise OSError("no answer")
            thread.join(timeout)
            for conn in accepted:
                conn.close()
    except OSError as exc:
        raise EmdataError(f"loopback 127.0.0.1 is not usable ({exc.strerror or exc}); {HINT}") from exc
