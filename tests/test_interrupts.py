"""echo4o_jax.interrupts: a Ctrl-C swallowed in a gc callback (as JAX's `_xla_gc_callback` would) is sent again."""

from __future__ import annotations

import gc
import sys
import threading

from echo4o_jax import interrupts


def test_a_keyboard_interrupt_swallowed_in_a_gc_callback_is_delivered_again(monkeypatch):
    monkeypatch.setattr(interrupts, "_installed", False)
    others = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: others.append(u.exc_type))  # restored after the test
    resent = threading.Event()
    interrupts.keep_ctrl_c(resend=resent.set, delay_s=0.0)
    interrupts.keep_ctrl_c(resend=lambda: others.append("second hook"))  # installed once: no effect

    raise_next = [KeyboardInterrupt, ValueError]

    def callback(phase, info):
        if phase == "start" and raise_next:
            raise raise_next.pop(0)()

    gc.callbacks.append(callback)
    try:
        gc.collect()  # the KeyboardInterrupt raised in the callback is swallowed by Python ...
        assert resent.wait(5)  # ... and sent again
        gc.collect()  # any other swallowed exception goes to the previous hook, as before
    finally:
        gc.callbacks.remove(callback)
    assert others == [ValueError]
