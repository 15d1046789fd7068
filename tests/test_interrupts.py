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


def test_reporting_main_makes_ctrl_c_and_bad_input_one_line(monkeypatch, capsys):
    """The data commands' absl main (latents, pack_stats): Ctrl-C is one line naming what is kept, status 130;
    bad input stays one `error:` line, status 2; the process ends through `exit_process`."""
    from echo4o_jax.data.records import RecordError
    from echo4o_jax.train.config_cli import reporting_main

    ended = []
    monkeypatch.setattr(interrupts, "exit_process", ended.append)
    raised = [KeyboardInterrupt(), RecordError("shard x: truncated")]

    def main(argv):
        assert argv == ["prog"]
        raise raised.pop(0)

    run = reporting_main("latents", main, interrupted="the finished shards are kept")
    run(["prog"])
    assert ended == [130] and capsys.readouterr().err == "latents: interrupted (Ctrl-C): the finished shards are kept\n"
    run(["prog"])
    assert ended == [130, 2] and capsys.readouterr().err == "error: shard x: truncated\n"


def test_end_now_ends_the_child_processes_too(tmp_path):
    """`end_now` (the commands' exit after a Ctrl-C) kills the process's multiprocessing children: the data
    pipeline's workers ignore Ctrl-C, and os._exit left them running for ever."""
    import os
    import subprocess
    import time

    script = (
        "import multiprocessing, signal, sys, time\n"
        "from echo4o_jax import interrupts\n"
        "def worker():\n"
        "    signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "    time.sleep(120)\n"
        "if __name__ == '__main__':\n"
        "    p = multiprocessing.get_context('spawn').Process(target=worker, daemon=True)\n"
        "    p.start()\n"
        "    print(p.pid, flush=True)\n"
        "    interrupts.end_now(130)\n")
    (tmp_path / "s.py").write_text(script)
    r = subprocess.run([sys.executable, str(tmp_path / "s.py")], capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 130, r.stderr
    pid = int(r.stdout.split()[0])
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, 9)
    raise AssertionError("the child process outlived end_now")
