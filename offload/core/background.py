"""Work done ahead, in the background, so that a stage later in the run finds it done: GPU kernels compiled while
a model loads, a VAE pass's tiles planned while the DiT samples.

Both kinds of work depend only on shapes and configs, not on weights, and both sat on the run's path the first time
a process met a size. A fresh machine's first 14B step at 480p81 (6 GiB cap, H200) spent 1.9 s compiling the Wan
block's one-pass Triton kernels (``families/wan/pointwise``): 7.79 s against 5.82 s for the second step; compiled
ahead, 6.25 s. Choosing a tiled decode's grid replays the VAE's code on the meta device (``families/wan/
vae_tiling``), 0.5-1 s of CPU at Wan's real size between the last step and the first tile; planned while the DiT
samples, nothing.

One :class:`BackgroundWork` belongs to the offload manager. It runs each piece of work once per key (or once at a
time, for work redone per run), in a daemon thread, and lets the stage that needs it wait for it, so that the two
never do the same work twice. Work that fails
only logs: the stage then does it itself, as it would have anyway.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections.abc import Callable, Hashable

log = logging.getLogger(__name__)

WAIT_SECONDS = 120.0
"""The longest a stage waits for work started ahead before it goes on (and does what it lacks itself): a compiler
or a planner that hangs must not hang the run."""


class BackgroundWork:
    """Work started ahead, per key (say, a model's component, its dtype and device): once, or one at a time."""

    def __init__(self) -> None:
        self._threads: dict[Hashable, threading.Thread | None] = {}
        """Per key asked for: its work's thread, or None where nothing was started (preparing failed or gave
        nothing to do)."""
        self._what: dict[Hashable, str] = {}
        self._lock = threading.Lock()
        self.seconds: dict[Hashable, float] = {}
        """How long each finished piece of work took (for logs and benchmarks)."""
        self.waited: dict[Hashable, float] = {}
        """How long the stage that needed it last waited for each piece of work still running then."""
        # The threads are daemons, so that work that hangs cannot keep the process from exiting; but one still
        # running PyTorch code while the interpreter exits aborts the process ("terminate called without an active
        # exception"), so an exiting process gives running work a bounded time to end first.
        atexit.register(_finish_at_exit, weakref.ref(self))

    def start(self, key: Hashable, prepare: Callable[[], Callable[[], object] | None], what: str,
              once: bool = True) -> bool:
        """Unless it ran (``once``) or runs for ``key``: call ``prepare`` here, in the caller's thread, and run what
        it returns in the background; True if work was started. ``once=False`` is for work whose inputs may differ
        from one run to the next under the same key (a budget): it starts again once the last one has ended.

        ``prepare`` builds what the work needs where building may touch process-wide state (a model built under the
        meta device sets the default device for a moment) that a background thread must not change under the
        caller; the work itself may only use thread-local state. ``what`` names the work in logs ("GPU kernels",
        "VAE decode tiles"). A ``prepare`` that fails only logs."""
        with self._lock:
            thread = self._threads.get(key)
            if key in self._threads and (once or (thread is not None and thread.is_alive())):
                return False
            self._threads[key] = None  # asked once, whatever happens next
            self._what[key] = what
            try:
                work = prepare()
            except Exception as e:  # noqa: BLE001 - the stage that needs it does it itself
                log.warning("preparing the %s for %s ahead failed (%s: %s); they are done when needed",
                            what, key, type(e).__name__, e)
                return False
            if work is None:
                return False
            thread = threading.Thread(target=self._run, args=(key, work), daemon=True,
                                      name=f"video-offload {what} {key}")
            self._threads[key] = thread
        thread.start()
        return True

    def _run(self, key: Hashable, work: Callable[[], object]) -> None:
        what = self._what[key]
        started = time.perf_counter()
        try:
            work()
        except Exception as e:  # noqa: BLE001 - the stage that needs it does it itself
            log.warning("the %s for %s failed in the background (%s: %s); they are done when needed",
                        what, key, type(e).__name__, e)
            return
        self.seconds[key] = time.perf_counter() - started
        log.info("%s for %s done in the background in %.2f s", what, key, self.seconds[key])

    def started(self, key: Hashable) -> bool:
        """Whether work for ``key`` was asked for (whether or not it started or finished)."""
        with self._lock:
            return key in self._threads

    def running(self) -> list[Hashable]:
        """The keys whose work is running now."""
        with self._lock:
            return [key for key, thread in self._threads.items() if thread is not None and thread.is_alive()]

    def finish(self, timeout: float = WAIT_SECONDS) -> None:
        """Wait for all running work, at most ``timeout`` seconds in all."""
        deadline = time.monotonic() + timeout
        for key in self.running():
            self.wait(key, max(deadline - time.monotonic(), 0.0))

    def wait(self, key: Hashable, timeout: float = WAIT_SECONDS) -> float:
        """Wait for ``key``'s work, if it was started; the seconds waited."""
        with self._lock:
            thread = self._threads.get(key)
            what = self._what.get(key, "work")
        if thread is None or not thread.is_alive():
            return 0.0
        started = time.perf_counter()
        thread.join(timeout)
        waited = self.waited[key] = time.perf_counter() - started
        if thread.is_alive():
            log.warning("the %s for %s are still being prepared after %.0f s; going on without them", what, key, waited)
        else:
            log.info("waited %.2f s for the %s for %s", waited, what, key)
        return waited


def _finish_at_exit(owner: weakref.ref) -> None:
    work = owner()
    if work is not None:
        work.finish(timeout=30.0)
