"""A failed checkpoint read, quietly: one RunError naming the file, no tracebacks after it.

When one of orbax's tensorstore reads fails, the reads still in flight report their own
failures later (unraisable "Event loop is closed" tracebacks, asyncio's "exception was never
retrieved" logs). `FailedReadNoise` drops exactly those reports while a read runs, and
`read_or_fail` turns the failure into one RunError.
"""

import contextlib
import gc
import logging
import sys
import time
from pathlib import Path

from jaxvae.base.errors import RunError

# A failed read waits for the reports of the reads still in flight until this long passes
# without a new one.
_QUIET_S = 0.2


_UNRETRIEVED = ("Task exception was never retrieved", "Future exception was never retrieved")


class FailedReadNoise(contextlib.AbstractContextManager):
    """Drops the noise of a failed checkpoint read, and only that, while the block runs.

    After one read fails, orbax closes its asyncio loop while tensorstore's other reads are
    still running; each then reports RuntimeError('Event loop is closed') as an unraisable
    traceback on stderr, and asyncio logs "Task (or Future) exception was never retrieved"
    (tensorstore's error inside) for the reads that failed too, when collected. Nothing
    awaits those reads. On entry this installs an unraisable hook and an asyncio log filter
    that drop exactly these reports and pass everything else on; on exit it puts the
    previous hook back and removes the filter. `settle` keeps a failed read's late reports
    inside the block.
    """

    def __init__(self):
        self.dropped = 0

    def _drop_closed_loop(self, unraisable):
        e = unraisable.exc_value
        if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
            self.dropped += 1
        else:
            self._previous(unraisable)

    def filter(self, record) -> bool:
        """logging filter: False (drop) for an unretrieved failed tensorstore read."""
        msg = record.getMessage()
        if msg.startswith(_UNRETRIEVED) and "tensorstore" in msg:
            self.dropped += 1
            return False
        return True

    def __enter__(self):
        self._previous, self._hook = sys.unraisablehook, self._drop_closed_loop
        sys.unraisablehook = self._hook
        logging.getLogger("asyncio").addFilter(self)
        return self

    def settle(self) -> None:
        """After a failed read: collect its tasks and wait until its reads stop reporting."""
        seen = -1
        while seen != self.dropped:
            seen = self.dropped
            gc.collect()  # the failed tasks log now, while the filter is installed
            time.sleep(_QUIET_S)

    def __exit__(self, *exc):
        logging.getLogger("asyncio").removeFilter(self)
        if sys.unraisablehook is self._hook:  # a hook installed meanwhile by others stays
            sys.unraisablehook = self._previous
        return False


def read_or_fail(read, path: Path, what: str, hint=lambda: ""):
    """`read()`, its failure (of any type: tensorstore, orbax, OS) a RunError naming path.

    The RunError is raised without the original exception attached: its traceback holds
    the failed read's tasks, which must be collected while their reports are dropped.
    """
    with FailedReadNoise() as noise:
        try:
            return read()
        except Exception as e:  # every error here means "unreadable"
            msg = str(e).splitlines()[0] if str(e) else ""
            error = RunError(f"{path}: cannot read {what} ({type(e).__name__}: {msg[:300]}); "
                             f"it is truncated or corrupt{hint()}")
        noise.settle()
    raise error
