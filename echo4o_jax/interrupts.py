"""A Ctrl-C that Python would swallow is delivered again (the commands' entry points install this).

Python cannot raise an exception out of a gc callback (nor out of `__del__` or a weakref callback): it prints
"Exception ignored in: ..." and goes on. JAX registers a gc callback (`_xla_gc_callback`) that runs at every
collection, frequent while a model is built or compiled, so a Ctrl-C that lands there used to be lost: the
command went on as if nothing had been pressed. `keep_ctrl_c()` hooks `sys.unraisablehook`: a swallowed
KeyboardInterrupt sends SIGINT to this process again a moment later, when the main thread runs ordinary code
that can raise it (or, in the train step loop, the handler that stops after the current step sees it)."""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Callable

_installed = False


def _send_sigint() -> None:
    os.kill(os.getpid(), signal.SIGINT)


def keep_ctrl_c(resend: Callable[[], None] = _send_sigint, delay_s: float = 0.05) -> None:
    """Install the hook (once per process; later calls do nothing). `resend` (tests) replaces the new SIGINT."""
    global _installed
    if _installed:
        return
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            t = threading.Timer(delay_s, resend)
            t.daemon = True
            t.start()
            return
        previous(unraisable)

    sys.unraisablehook = hook
    _installed = True


EXIT_INTERRUPTED = 128 + signal.SIGINT


class Terminated(BaseException):
    """A SIGTERM, raised in the main thread by the handler of commands that clean up after it as after a Ctrl-C
    (BaseException, as KeyboardInterrupt: `except Exception` does not swallow it)."""


def raise_terminated(signum, frame) -> None:
    """A SIGTERM handler: raise Terminated."""
    raise Terminated()


def end_now(rc: int) -> None:
    """End the process with `rc` at once, without the interpreter's teardown: after a Ctrl-C an XLA compilation
    may still run on a worker thread, and the teardown then can crash (a segfault after the command's own
    'interrupted' line). Call it only where nothing is being written (the commands' files are closed)."""
    sys.stdout.flush()
    sys.stderr.flush()
    import multiprocessing

    for child in multiprocessing.active_children():  # the data pipeline's workers (they ignore Ctrl-C and would
        child.kill()  # outlive this process: multiprocessing ends them at a normal exit only)
    os._exit(rc)


def exit_process(rc: int) -> None:
    """A command's `if __name__ == "__main__"` exit: status `rc`; an interrupted run (130) ends with `end_now`."""
    if rc == EXIT_INTERRUPTED:
        end_now(rc)
    raise SystemExit(rc)
