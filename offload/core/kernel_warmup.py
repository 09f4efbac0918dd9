"""GPU kernels compiled in the background while a model loads, so that its first denoising step does not wait.

A family's DiT forward may launch kernels that are compiled on first use (the Wan block's one-pass Triton kernels,
``families/wan/pointwise``). On a machine that has never run them that compile sat inside the first step: 1.9 s of
the first 14B step at 480p81 under a 6 GiB cap on an H200 (7.79 s against 5.82 s for the second step), most of what
kept a fresh machine's whole run over 1.05x the resident one (issue 10); compiled here, the first step took 6.25 s.
Nothing in the compile depends on the weights, only on the model's shapes and dtypes, so it can start as soon as the
DiT is about to be placed and run beside what comes before its first step: reading the weights into host memory, the
prompt's encode, the start frame's encode.

One :class:`KernelWarmup` belongs to the offload manager. It runs each compile once, in a daemon thread, and lets the
sampler wait for it before the forward that needs the kernels, so the two never compile the same kernel twice. A
compile that fails only logs: the first forward then compiles (or falls back) as it would have anyway.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable

log = logging.getLogger(__name__)

WAIT_SECONDS = 120.0
"""The longest a forward waits for a background compile before it goes on (and compiles what it lacks itself): a
compiler that hangs must not hang the run."""


class KernelWarmup:
    """Background compiles, at most one per key (a model's component, its dtype and device)."""

    def __init__(self) -> None:
        self._threads: dict[Hashable, threading.Thread | None] = {}
        """Per key asked for: its compile's thread, or None where nothing was started (preparing failed or
        gave nothing to compile)."""
        self._lock = threading.Lock()
        self.seconds: dict[Hashable, float] = {}
        """How long each finished compile took (for logs and benchmarks)."""

    def start(self, key: Hashable, prepare: Callable[[], Callable[[], None] | None]) -> bool:
        """Unless it ran or runs for ``key``: call ``prepare`` here, in the caller's thread, and run what it returns
        (the compile) in the background; True if a compile was started. ``prepare`` builds what the compile needs
        where building may touch process-wide state (a model built under the meta device sets the default device
        for a moment) that a background thread must not change under the caller; the compile itself may only use
        thread-local state. A ``prepare`` that fails only logs, once per key."""
        with self._lock:
            if key in self._threads:
                return False
            self._threads[key] = None  # asked once, whatever happens next
            try:
                compile_kernels = prepare()
            except Exception as e:  # noqa: BLE001 - the first forward compiles what this did not
                log.warning("preparing the GPU kernels' compile for %s failed (%s: %s); the first step compiles them",
                            key, type(e).__name__, e)
                return False
            if compile_kernels is None:
                return False
            thread = threading.Thread(target=self._run, args=(key, compile_kernels), daemon=True,
                                      name=f"video-offload kernel warm-up {key}")
            self._threads[key] = thread
        thread.start()
        return True

    def _run(self, key: Hashable, compile_kernels: Callable[[], None]) -> None:
        started = time.perf_counter()
        try:
            compile_kernels()
        except Exception as e:  # noqa: BLE001 - the first forward compiles what this did not
            log.warning("compiling the GPU kernels ahead of %s failed (%s: %s); the first step compiles them",
                        key, type(e).__name__, e)
            return
        self.seconds[key] = time.perf_counter() - started
        log.info("GPU kernels for %s compiled in the background in %.2f s", key, self.seconds[key])

    def wait(self, key: Hashable, timeout: float = WAIT_SECONDS) -> float:
        """Wait for ``key``'s compile, if one was started; the seconds waited."""
        with self._lock:
            thread = self._threads.get(key)
        if thread is None or not thread.is_alive():
            return 0.0
        started = time.perf_counter()
        thread.join(timeout)
        waited = time.perf_counter() - started
        if thread.is_alive():
            log.warning("the GPU kernels for %s are still compiling after %.0f s; going on without them", key, waited)
        else:
            log.info("waited %.2f s for the GPU kernels for %s", waited, key)
        return waited
