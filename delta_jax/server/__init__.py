"""`delta-jax serve`: an OpenAI-compatible HTTP server over the continuous-batching Scheduler.

    sock = listen("127.0.0.1", 8000)                  # bound first, so a busy port fails before the model loads
    engine = Engine.from_pretrained("smollm2-135m")
    serve(engine, engine.scheduler(slots=8), sock, model_name="smollm2-135m")

Needs fastapi (with starlette and pydantic) and uvicorn.
"""

from __future__ import annotations

import socket

from delta_jax.config import ConfigError
from delta_jax.server.app import create_app
from delta_jax.server.worker import Worker, log

__all__ = ["Worker", "create_app", "listen", "log", "serve", "server"]


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) (port 0: a free one); ConfigError naming the address if it cannot be."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"port must be between 0 and 65535, got {port}")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port}: {e}")
    sock.set_inheritable(True)
    return sock


def server(app, sock: socket.socket):
    """A uvicorn server for `app` on `sock` that logs its address once it accepts connections; `.run(sockets=[sock])`
    serves (from any thread), `should_exit = True` stops it."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                host, port = sock.getsockname()[:2]
                log(f"listening on http://{host}:{port}")

    return Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5))


def serve(engine, scheduler, sock: socket.socket, *, model_name: str) -> None:
    """Serves `engine` through `scheduler` on `sock` until interrupted."""
    server(create_app(engine, scheduler, model_name=model_name), sock).run(sockets=[sock])
