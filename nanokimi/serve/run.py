"""Running the app: in the foreground (`nanokimi serve`) or on a background thread (tests, benchmarks)."""
from __future__ import annotations

import socket
import threading
import time

import uvicorn


def check_can_listen(host: str, port: int) -> None:
    """Fail in one line, before the model loads, when (host, port) cannot be listened on (port taken, bad host)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {port}.")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        socket.create_server((host, port), family=family).close()  # SO_REUSEADDR, as uvicorn binds
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port (or --host), "
                         "or stop the process that uses it.") from None


def serve_forever(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


class BackgroundServer:
    """`with BackgroundServer(app) as s: httpx.get(s.url + "/health")`; port 0 picks a free port."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 600.0):
        self.config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on",
                                     timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, name="nanokimi-http", daemon=True)
        self.startup_timeout = startup_timeout
        self.host, self.port = host, port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start (see the log above).")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
