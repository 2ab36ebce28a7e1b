"""Faults a long run meets (issue 26), piece by piece: the run directory's lock, a full disk
at each writer (injected ``OSError(ENOSPC)``, so CI covers it without root), a save killed
before ``run.json``, the watcher that speaks for a killed run, PCACE_DEBUG, bars in a log.

The lock's tests use real processes: a helper holds a directory's lock, and is SIGKILLed.
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from pcace.cli import guard
from pcace.cli import main as cli
from pcace.core import files
from pcace.core.progress import LogBar, progress_bar
from pcace.results import checkpoints, lock, rundir
from pcace.results.checkpoints import (
    load_layer_checkpoints,
    save_layer_checkpoint,
    start_checkpoints,
)
from pcace.results.lock import LOCK_NAME, LockInfo, RunDirBusy, lock_run_dir, read_lock
from pcace.results.rundir import RunDirError, add_files, prepare_run_dir, read_run, save_run

SRC = Path(__file__).resolve().parents[1] / "src"
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])]))
SETTINGS = {"weights_sha256": "abc", "layers": ["a", "b"], "seed": 0}


def table(layer: str) -> pd.DataFrame:
    return pd.DataFrame({"layer": layer, "channel": [0, 1], "pcace": [0.25, 0.5]})


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


# --- a helper process that holds a directory's lock -------------------------------------------

HOLDER = """
import sys
from pcace.results.lock import lock_run_dir
lock = lock_run_dir(sys.argv[1])
print("locked", flush=True)
sys.stdin.read()  # until the test closes stdin (or kills this process)
lock.release()
print("released", flush=True)
"""


@pytest.fixture
def holder(tmp_path):
    """A process holding ``tmp_path / "run"``'s lock; yields (process, directory)."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc, out
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def test_a_second_run_is_refused_naming_the_first(holder):
    proc, out = holder
    for attempt in (lambda: lock_run_dir(out), lambda: prepare_run_dir(out),
                    lambda: prepare_run_dir(out, force=True),
                    lambda: prepare_run_dir(out, resume=True),
                    lambda: start_checkpoints(out, SETTINGS),
                    lambda: save_run(out, {"layers.csv": "layer\n"}, {})):
        with pytest.raises(RunDirBusy, match=rf"in use by another pcace run \(pid {proc.pid} "
                           rf"on host {socket.gethostname()}, started .*kill {proc.pid}"):
            attempt()
    assert read_lock(out).pid == proc.pid
    proc.stdin.close()  # the holder lets go: the file goes with it, the directory is free
    assert proc.stdout.readline().strip() == "released"
    assert not (out / LOCK_NAME).exists()
    with lock_run_dir(out):
        pass


def test_the_lock_of_a_killed_process_is_taken_over_with_a_note(holder):
    proc, out = holder
    proc.kill()  # SIGKILL: no handler runs, the lock file stays behind
    proc.wait(timeout=30)
    assert read_lock(out).pid == proc.pid
    notes = []
    with lock_run_dir(out, note=notes.append) as taken:
        assert read_lock(out).pid == os.getpid() == taken.info.pid
    assert len(notes) == 1 and f"pid {proc.pid}" in notes[0] and "no longer runs" in notes[0]
    assert not (out / LOCK_NAME).exists()


def _write_lock(out: Path, **fields) -> None:
    out.mkdir(parents=True, exist_ok=True)
    info = {**LockInfo.this_process().__dict__, **fields}
    (out / LOCK_NAME).write_text(json.dumps(info))


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
    _write_lock(tmp_path, host="node-17.cluster", pid=4242)
    with pytest.raises(RunDirBusy, match=rf"on another host \(pid 4242 on host node-17.cluster.*"
                       rf"remove {tmp_path / LOCK_NAME}"):
        prepare_run_dir(tmp_path, resume=True)
    (tmp_path / LOCK_NAME).unlink()  # what the message says to do once that run is over
    assert prepare_run_dir(tmp_path) == tmp_path


def test_a_dead_or_reused_pid_is_taken_over(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _write_lock(tmp_path / "dead", pid=gone.pid, proc_start=None)
    with pytest.warns(UserWarning, match=rf"no longer runs \(pid {gone.pid} "):
        assert prepare_run_dir(tmp_path / "dead") == tmp_path / "dead"  # the lock is no file
    # the parent process runs, but started at another time than the file says: a reused pid
    _write_lock(tmp_path / "reused", pid=os.getppid(), proc_start=1)
    with pytest.warns(UserWarning, match="no longer runs"):
        lock_run_dir(tmp_path / "reused").release()
    # a live process that holds no kernel lock on the file: a copied run directory
    _write_lock(tmp_path / "copied", pid=os.getppid(), proc_start=lock._proc_start(os.getppid()))
    with pytest.warns(UserWarning, match="runs but does not hold it"):
        lock_run_dir(tmp_path / "copied").release()


def test_reentrant_in_one_process_and_held_by_checkpoints_until_saved(tmp_path):
    with lock_run_dir(tmp_path) as outer:
        with lock_run_dir(tmp_path) as inner:
            assert inner is outer
        assert (tmp_path / LOCK_NAME).exists()  # the outer still holds it
        assert lock.holds_run_dir(tmp_path / "checkpoints" / "label-3")
    assert not (tmp_path / LOCK_NAME).exists()
    start_checkpoints(tmp_path, SETTINGS)  # the library's own hold, for pcace.rank(...)
    assert lock.holds_run_dir(tmp_path) and read_lock(tmp_path).pid == os.getpid()
    save_run(tmp_path, {"layers.csv": "layer\n"}, {"pcace_version": "t"})
    assert not lock.holds_run_dir(tmp_path) and not (tmp_path / LOCK_NAME).exists()


def test_refused_checkpoints_do_not_keep_the_directory(tmp_path):
    start_checkpoints(tmp_path, SETTINGS)
    lock.release_run_dir(tmp_path)
    with pytest.raises(RunDirError, match="other settings"):
        start_checkpoints(tmp_path, {**SETTINGS, "seed": 1})
    assert not lock.holds_run_dir(tmp_path)


# --- a full disk at each writer ---------------------------------------------------------------

def test_full_disk_at_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "_write_info", enospc)
    with pytest.raises(RunDirError, match=r"cannot write in .*\(No space left on device\); "
                       "free space"):
        prepare_run_dir(tmp_path / "run")
    assert not lock.holds_run_dir(tmp_path / "run")


def test_full_disk_at_the_checkpoints(tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(checkpoints, "atomic_write", enospc)
        with pytest.raises(RunDirError, match=r"cannot start the run's checkpoints .*No space"):
            start_checkpoints(tmp_path, SETTINGS)
    start_checkpoints(tmp_path, SETTINGS)
    save_layer_checkpoint(tmp_path, "a", table("a"))
    with monkeypatch.context() as m:
        m.setattr(files, "write_data", enospc)
        with pytest.raises(RunDirError, match=r"could not checkpoint layer 'b' .*No space left.*"
                           "layers finished before are kept.*resume=True"):  # API words
            save_layer_checkpoint(tmp_path, "b", table("b"))
    assert list(load_layer_checkpoints(tmp_path, SETTINGS)) == ["a"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if ".tmp-" in p.name]


def test_full_disk_at_run_json_and_added_files(tmp_path, monkeypatch):
    save_run(tmp_path, {"layers.csv": "layer\na\n"}, {"pcace_version": "t"})
    before = (tmp_path / "run.json").read_bytes()
    with monkeypatch.context() as m:
        m.setattr(rundir, "atomic_write", enospc)
        with pytest.raises(RunDirError, match=r"could not write .*run.json \(No space.*free "
                           "space and save again"):
            save_run(tmp_path, {"layers.csv": "layer\nb\n"}, {"pcace_version": "t"})
        files.atomic_write(tmp_path / "report.html", "<html></html>")
        with pytest.raises(RunDirError, match="could not write .*run.json"):
            add_files(tmp_path, ["report.html"])
    assert (tmp_path / "run.json").read_bytes() == before  # the old record stands


def test_full_disk_at_a_report_file_leaves_nothing_half_written(tmp_path, monkeypatch):
    files.atomic_write(tmp_path / "report.html", "old")
    monkeypatch.setattr(files, "write_data", enospc)
    with pytest.raises(OSError, match="No space"):
        files.atomic_write(tmp_path / "report.html", "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
    assert (tmp_path / "report.html").read_text() == "old"


# --- a run killed mid-write or mid-save -------------------------------------------------------

def test_a_save_killed_before_run_json_is_taken_up(tmp_path):
    """SIGKILL between the files and run.json leaves unlisted files beside checkpoints."""
    for name in ("run", "other"):
        root = tmp_path / name
        start_checkpoints(root, SETTINGS)
        save_layer_checkpoint(root, "a", table("a"))
        lock.release_run_dir(root)
        (root / "channels.csv").write_text("layer,channel\n")  # the save's first files
        torn = files.temp_name(root / "checkpoints" / "layer-b.npz")
        torn.write_bytes(b"PK\x03\x04 half a checkpoint")  # a writer killed mid-write
    root = tmp_path / "run"
    assert prepare_run_dir(root, resume=True) == root
    assert not torn.exists() or torn.parent.parent != root
    assert not [p for p in (root / "checkpoints").iterdir() if ".tmp-" in p.name]
    save_run(root, {"channels.csv": table("a"), "layers.csv": "layer\na\n"},
             {"pcace_version": "t"})
    assert read_run(root).complete
    other = tmp_path / "other"
    prepare_run_dir(other, force=True)  # replaced: the unlisted files were the run's own
    assert not any(other.iterdir())


def test_checkpoints_removed_under_a_run_say_so(tmp_path):
    start_checkpoints(tmp_path, SETTINGS)
    (tmp_path / "checkpoints" / "state.json").unlink()  # `rm -r` while the run goes on
    with pytest.raises(RunDirError, match="were removed while it ran.*start it again"):
        save_layer_checkpoint(tmp_path, "a", table("a"))
    with pytest.raises(RunDirError, match="call start_checkpoints"):
        save_layer_checkpoint(tmp_path / "never", "a", table("a"))


# --- the watcher: a word for a run killed outright --------------------------------------------

WATCHED = """
import os, signal, sys
from pcace.cli.guard import start_watcher
start_watcher(sys.argv[1])
print("watched", flush=True)
if sys.argv[2] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("how", ["kill", "exit"])
def test_the_watcher_speaks_only_for_a_killed_run(tmp_path, how):
    start_checkpoints(tmp_path, SETTINGS)
    save_layer_checkpoint(tmp_path, "a", table("a"))
    lock.release_run_dir(tmp_path)
    proc = subprocess.run([sys.executable, "-c", WATCHED, str(tmp_path), how],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert "watched" in proc.stdout
    if how == "kill":
        assert proc.returncode == -signal.SIGKILL
        assert "ended abruptly" in proc.stderr, proc.stderr
        assert f"1 of 2 layers was finished and checkpointed in {tmp_path}" in proc.stderr
        assert "--resume" in proc.stderr
    else:
        assert proc.returncode == 0 and proc.stderr == ""


def test_the_watcher_can_be_switched_off(monkeypatch, tmp_path):
    monkeypatch.setenv(guard.ENV, "0")
    assert guard.start_watcher(tmp_path) is False
    assert guard.checkpointed_layers(tmp_path) == (0, None)


# --- the command's own words ------------------------------------------------------------------

@pytest.mark.parametrize("value, on", [("", False), ("0", False), ("false", False),
                                       ("No", False), ("1", True), ("yes", True)])
def test_pcace_debug_values(monkeypatch, value, on):
    monkeypatch.setenv("PCACE_DEBUG", value)
    assert cli.debugging() is on


@pytest.mark.parametrize("value", ["0", "1"])
def test_pcace_debug_zero_keeps_tracebacks_off(monkeypatch, capsys, value):
    def broken(args):
        raise RuntimeError("an internal invariant failed\nsecond line")

    monkeypatch.setitem(cli.COMMANDS, "report", broken)
    monkeypatch.setenv("PCACE_DEBUG", value)
    if value == "1":
        with pytest.raises(RuntimeError):
            cli.main(["report", "somewhere"])
        return
    assert cli.main(["report", "somewhere"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pcace: error: unexpected RuntimeError: an "
                                               "internal invariant failed second line")
    assert "PCACE_DEBUG=1" in err[0]


# --- progress bars in a log -------------------------------------------------------------------

def test_a_bar_in_a_log_file_writes_its_final_line_once(tmp_path):
    path = tmp_path / "job.log"
    with open(path, "w") as log:
        for _ in progress_bar(range(50), desc="scoring", unit="ch", file=log, mininterval=0):
            pass
        bar = progress_bar(total=10, desc="null", file=log, mininterval=0)
        bar.update(4)
        bar.close()  # stopped early: its last state once
        progress_bar(total=3, desc="hidden", file=log, disable=True).close()
    text = path.read_text()
    assert "\r" not in text
    lines = text.splitlines()
    assert sum("50/50" in line for line in lines) == 1
    assert [line for line in lines if line.startswith("scoring: 100%")]
    assert sum("4/10" in line for line in lines) == 1 and lines[-1].startswith("null:  40%")
    assert not any("hidden" in line for line in lines)


def test_a_bar_on_a_terminal_is_tqdms():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    bar = progress_bar(total=2, file=Terminal())
    assert not isinstance(bar, LogBar)
    bar.close()
    assert isinstance(progress_bar(total=2, file=io.StringIO(), disable=True), LogBar)


def test_log_lines_come_at_most_every_interval():
    log = io.StringIO()
    with LogBar(total=1000, desc="slow", file=log, mininterval=3600) as bar:
        for _ in range(1000):
            bar.update(1)
            time.sleep(0)
    lines = log.getvalue().splitlines()
    assert [line.split("|")[0] for line in lines] == ["slow:   0%", "slow: 100%"]
