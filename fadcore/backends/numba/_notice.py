"""One log line when the numba backend compiles (a cold start), none when it loads its cache.

A watcher thread: if importing the kernels or the first run of the interpreter uses more
CPU time than a cached load ever does (CPU, not wall time: a busy machine slows a load
without making it a compile), the user is told what is happening and how to avoid it.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("fadcore")

MESSAGE = ("fadcore: compiling the numba backend (first run in this environment: ~20 s, then "
           "cached on disk; `python -m fadcore.warmup` or `fad warmup` does it ahead of time)")
_said = threading.Event()


class compiling:
    """``with compiling(): ...`` logs MESSAGE once per process if the block uses more than
    ``after`` seconds of CPU time."""

    def __init__(self, after: float = 1.5, poll: float = 0.25):
        self.after = after
        self.poll = poll
        self.done = threading.Event()

    def __enter__(self):
        if not _said.is_set():
            self.cpu0 = time.process_time()
            threading.Thread(target=self._watch, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        return False

    def _watch(self):
        while not self.done.wait(self.poll):
            if time.process_time() - self.cpu0 > self.after:
                if not _said.is_set():
                    _said.set()
                    log.warning(MESSAGE)
                return
