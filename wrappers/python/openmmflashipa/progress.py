"""Progress bars on stderr for long work (tqdm), and a quiet stand-in when they are switched off."""

import contextlib
import sys
import time

from tqdm import tqdm


class _Silent:
    def update(self, n=1):
        pass

    def set_postfix_str(self, text):
        pass

    def close(self):
        pass


def bar(total, description, enabled=True, unit="step"):
    """A progress bar over `total` units (tqdm on stderr), or a silent object with the same methods."""
    if not enabled:
        return _Silent()
    return tqdm(total=total, desc=description, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=True)


@contextlib.contextmanager
def spinner(description, enabled=True):
    """For work with no unit count (one C++ call): prints the description, then the elapsed time."""
    started = time.time()
    if enabled:
        print(description + " ...", file=sys.stderr, flush=True)
    yield
    if enabled:
        print("  done in %.1f s" % (time.time() - started), file=sys.stderr, flush=True)
