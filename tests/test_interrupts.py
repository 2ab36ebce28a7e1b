"""Tests of pcace.core.interrupts: real signals sent to a real process running numba code."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from pcace.core.interrupts import Interrupted, deferred_signals, exit_code_for

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

SRC = str(Path(__file__).resolve().parents[1] / "src")

# A numba loop of about 0.1 s per call: a signal sent at a random moment lands inside it
# most of the time. With check=True the guarded loop stops between calls.
SCRIPT = textwrap.dedent("""
    import sys, numpy as np, numba
    from pcace.core.interrupts import Interrupted, deferred_signals

    @numba.njit(cache=False)
    def spin(x, rounds):
        total = 0.0
        for _ in range(rounds):
            for i in range(x.size):
                total += np.sin(x[i])
        return total

    x = np.random.rand(200_000)
    spin(x, 1)  # compile
    guarded, check = sys.argv[1] == "guarded", sys.argv[2] == "check"
    if not guarded:
        print("ready", flush=True)
        while True:
            spin(x, 50)
    try:
        with deferred_signals() as guard:
            print("ready", flush=True)  # the handlers are in place
            while True:
                spin(x, 50)
                if check:
                    guard.check()
    except Interrupted as err:
        print(f"stopped: {err}", flush=True)
        sys.exit(err.exit_code)
""")


def _start(tmp_path: Path, *args: str) -> subprocess.Popen:
    script = tmp_path / "spin.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    return proc


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_inside_numba_stops_cleanly(tmp_path, signum, code):
    proc = _start(tmp_path, "guarded", "check")
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "SystemError" not in err and "Traceback" not in err, err
    assert f"interrupted by {signal.Signals(signum).name}" in out
    assert "stopping after the current step" in err


def test_second_signal_aborts_at_once(tmp_path):
    proc = _start(tmp_path, "guarded", "no-check")  # never reaches a check
    proc.send_signal(signal.SIGINT)
    assert "stopping after" in proc.stderr.readline()
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGINT  # ended by the signal itself


def test_unguarded_sigterm_kills_without_cleanup(tmp_path):
    """What happens without the guard: the process dies by the signal, nothing runs."""
    proc = _start(tmp_path, "plain", "no-check")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGTERM


def test_handlers_restored_and_recorded_in_process():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with deferred_signals(message=False) as guard:
        assert guard.active
        assert signal.getsignal(signal.SIGINT) is not before[0]
        guard.check()  # nothing recorded
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(Interrupted) as info:
            for _ in range(1000):  # the handler runs at the next bytecode boundary
                guard.check()
        assert info.value.signum == signal.SIGTERM and info.value.exit_code == 143
        assert guard.exit_code == 143
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_no_op_outside_main_thread():
    seen = {}

    def work():
        with deferred_signals() as guard:
            seen["active"] = guard.active
            guard.check()

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert seen == {"active": False}


def test_exit_codes():
    assert exit_code_for(signal.SIGINT) == 130 and exit_code_for(signal.SIGTERM) == 143
    assert str(Interrupted(signal.SIGINT)) == "interrupted by SIGINT"
