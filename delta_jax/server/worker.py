"""The thread that drives a Scheduler for the server: it steps while there is work and sleeps otherwise."""

from __future__ import annotations

import sys
import threading
import time
import traceback
from typing import Optional

from delta_jax.scheduler import Request, Scheduler


def log(msg: str) -> None:
    """A progress line on stderr, as the rest of the CLI writes them."""
    print(f"[delta-jax] {msg}", file=sys.stderr, flush=True)


class Worker:
    """Runs `scheduler.step()` on one background thread while any request waits or runs, and sleeps on an
    event otherwise (set by `submit` and `cancel`).

    If a step raises, the scheduler's device state is lost: every live request gets `("error", message)`
    on its `events`, `error` holds the message and `submit` refuses from then on.
    """

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.error: Optional[str] = None
        self._wake = threading.Event()
        self._stopping = False
        self._live: list[Request] = []
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    def warmup(self) -> float:
        """Compiles the prefill of the shortest prompts, the slot updates and the decode loop by running one
        request on the calling thread (before `start`); clears the metrics it leaves. Returns seconds."""
        s = self.scheduler
        t0 = time.perf_counter()
        s.submit(Request(prompt=[0], max_tokens=min(s.chunk + 1, self.room(1))))
        s.run()
        s.reset_metrics()
        return time.perf_counter() - t0

    def room(self, prompt_tokens: int) -> int:
        """New tokens that fit after a prompt of `prompt_tokens` in one slot and in the pool (at least 1: when
        nothing fits, `submit` names the excess)."""
        spec = self.scheduler.spec
        return max(1, min(spec.max_tokens, self.scheduler.alloc.capacity * spec.page_size) - prompt_tokens)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="delta-jax-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def submit(self, req: Request) -> Request:
        """Queues `req` (raises ConfigError when it can never run, RuntimeError after a failed step)."""
        with self._lock:
            if self.error is not None:
                raise RuntimeError(f"the scheduler stopped after an error: {self.error}")
            self.scheduler.submit(req)
            self._live.append(req)
        self._wake.set()
        return req

    def cancel(self, request_id: str) -> None:
        self.scheduler.cancel(request_id)
        self._wake.set()

    def _loop(self) -> None:
        s = self.scheduler
        while not self._stopping:
            if not s.has_work():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                s.step()
            except Exception as e:  # noqa: BLE001 - the device state is gone: fail every request, keep serving errors
                self._fail(f"{type(e).__name__}: {e}".splitlines()[0])
                traceback.print_exc(file=sys.stderr)
                return
            with self._lock:
                self._live = [r for r in self._live if not r.done]

    def _fail(self, message: str) -> None:
        log(f"scheduler step failed: {message}")
        with self._lock:
            self.error = message
            live, self._live = self._live, []
        for req in live:
            if not req.done:
                req.events.put(("error", message))
