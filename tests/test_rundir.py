"""Tests of pcace.results.rundir: preflight, atomic saves, verification, checkpoints, spills."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from pandas.testing import assert_frame_equal

from pcace.capture.spill import clean_stale_spills, make_spill_dir, spill_owner
from pcace.core import files
from pcace.core.files import atomic_write
from pcace.results import common, rundir
from pcace.results.checkpoints import (
    load_layer_checkpoints,
    remove_checkpoints,
    run_fingerprint,
    save_layer_checkpoint,
    start_checkpoints,
)
from pcace.results.rundir import RunDirError, add_files, prepare_run_dir, read_run, save_run


def channel_table(layer: str, n: int = 4, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "layer": layer, "channel": np.arange(n), "pcace": rng.random(n),
        "n_components": np.full(n, 3), "explained_variance": rng.random(n),
        "dead": np.zeros(n, dtype=bool), "null_mean": rng.random(n),
        "p_value": rng.random(n), "q_value": [np.nan] + list(rng.random(n - 1)),
        "ci_low": rng.random(n), "ci_high": rng.random(n),
        "rank_low": np.arange(1, n + 1), "rank_high": np.arange(1, n + 1) + 1,
    })


def files_for(tables: list[pd.DataFrame]) -> dict:
    channels = pd.concat(tables, ignore_index=True)
    layers = pd.DataFrame({"layer": channels.layer.unique()})
    return {"channels.csv": channels, "layers.csv": layers,
            "scores.csv": pd.DataFrame({"score": [0.5, 1.5]})}


def save_example(root, complete=True, run_id=None):
    manifest = {"pcace_version": "test", "layers": ["a", "b"]}
    if run_id:
        manifest["run_id"] = run_id
    return save_run(root, files_for([channel_table("a"), channel_table("b", seed=1)]),
                    manifest, complete=complete)


# --- (a) preflight -----------------------------------------------------------------------------

def test_preflight_creates_and_accepts_empty(tmp_path):
    out = prepare_run_dir(tmp_path / "a" / "b")
    assert out.is_dir() and not any(out.iterdir())
    assert prepare_run_dir(out) == out


def test_preflight_refuses_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunDirError, match="is a file, not a directory"):
        prepare_run_dir(tmp_path / "f")
    with pytest.raises(RunDirError, match="cannot create"):
        prepare_run_dir(tmp_path / "f" / "sub")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_preflight_refuses_read_only(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(RunDirError, match="cannot write in .*writable location"):
            prepare_run_dir(ro)
        with pytest.raises(RunDirError, match="cannot create"):
            prepare_run_dir(ro / "run")
    finally:
        ro.chmod(0o700)


def test_preflight_refuses_non_empty(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="not empty .*notes.txt.*empty or new directory"):
        prepare_run_dir(tmp_path)
    with pytest.raises(RunDirError, match="no pcace run"):
        prepare_run_dir(tmp_path, force=True)
    with pytest.raises(RunDirError, match="nothing to resume"):
        prepare_run_dir(tmp_path, resume=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_force_removes_exactly_the_listed_files(tmp_path):
    save_example(tmp_path)
    atomic_write(tmp_path / "assets" / "maps.npz", b"old maps")
    atomic_write(tmp_path / "report.html", "<html>old</html>")
    add_files(tmp_path, ["assets", "report.html"])
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "data.csv").write_text("1,2")
    with pytest.raises(RunDirError, match="force=True to replace"):
        prepare_run_dir(tmp_path)
    prepare_run_dir(tmp_path, force=True)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == \
        ["mine", "mine/data.csv", "notes.txt"]


def test_force_keeps_a_changed_run_file(tmp_path):
    """A user's own channels.csv (edited after the run) is neither removed nor overwritten."""
    save_example(tmp_path)
    (tmp_path / "channels.csv").write_text("my own table\n")
    with pytest.raises(RunDirError, match="channels.csv .*changed since pcace wrote it"):
        prepare_run_dir(tmp_path, force=True)
    assert (tmp_path / "channels.csv").read_text() == "my own table\n"


def test_force_refuses_traversal_in_an_edited_run_json(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    run = tmp_path / "run"
    save_example(run)
    manifest = json.loads((run / "run.json").read_text())
    manifest["files"]["../victim.txt"] = {"size": 4, "sha256": files.file_sha256(victim)}
    (run / "run.json").write_text(json.dumps(manifest))
    with pytest.raises(RunDirError, match="not a plain relative path"):
        prepare_run_dir(run, force=True)
    assert victim.read_text() == "keep"


def test_force_refuses_unlisted_reserved_leftovers(tmp_path):
    save_example(tmp_path)
    (tmp_path / "report.html").write_text("someone's report")
    with pytest.raises(RunDirError, match="report.html.*does not list"):
        prepare_run_dir(tmp_path, force=True)
    assert (tmp_path / "report.html").exists()


def test_force_and_resume_exclusive(tmp_path):
    with pytest.raises(RunDirError, match="not both"):
        prepare_run_dir(tmp_path, force=True, resume=True)


# --- (b) atomic saves ----------------------------------------------------------------------------

def test_save_lists_every_file_and_writes_run_json_last(tmp_path, monkeypatch):
    order = []
    real = os.replace

    def spy(src, dst):
        order.append(os.path.basename(dst))
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", spy)
    written = save_example(tmp_path)
    assert order[-1] == "run.json" and set(order[:-1]) == {"channels.csv", "layers.csv",
                                                           "scores.csv"}
    on_disk = json.loads((tmp_path / "run.json").read_text())
    assert on_disk == json.loads(json.dumps(written))
    assert on_disk["complete"] is True and on_disk["format"] == rundir.FORMAT
    for name, entry in on_disk["files"].items():
        assert entry["size"] == (tmp_path / name).stat().st_size
        assert entry["sha256"] == files.file_sha256(tmp_path / name)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_disk_full_during_save_leaves_previous_run_intact(tmp_path, monkeypatch):
    save_example(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real = files.write_data
    calls = []

    def fill_disk(path, data):
        calls.append(path)
        if len(calls) == 2:
            path.write_bytes(b"trunc")
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(files, "write_data", fill_disk)
    with pytest.raises(RunDirError, match="No space left.*nothing was replaced.*free disk"):
        save_run(tmp_path, files_for([channel_table("c", 9)]), {"pcace_version": "t"})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp left
    assert read_run(tmp_path).complete


def _half_then_disk_full(path, data):
    """A write that gets half its bytes out, then finds the disk full."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    path.write_bytes(raw[: len(raw) // 2])
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_write_leaves_the_old_file_or_none(tmp_path, monkeypatch):
    atomic_write(tmp_path / "report.html", "<html>old page</html>")
    monkeypatch.setattr(files, "write_data", _half_then_disk_full)
    with pytest.raises(OSError, match="No space"):
        atomic_write(tmp_path / "report.html", "<html>" + "new page " * 100 + "</html>")
    with pytest.raises(OSError, match="No space"):
        atomic_write(tmp_path / "figures" / "overview.png", b"\x89PNG" + bytes(500))
    assert (tmp_path / "report.html").read_text() == "<html>old page</html>"
    assert not (tmp_path / "figures" / "overview.png").exists()
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["report.html"]


def test_a_report_that_fails_mid_write_leaves_no_half_file(tmp_path, monkeypatch):
    """Pages, figures and assets: a crash mid-write leaves each the old file or none."""
    from PIL import Image
    from test_report_evidence import hand_result

    from pcace.viz import assets as asset_module
    from pcace.viz import write_report

    run = tmp_path / "run"
    hand_result(["conv1", "conv2"], strong=("conv2",)).save(run)
    page = write_report(run, progress=False)
    old_page = page.read_bytes()
    monkeypatch.setattr(files, "write_data", _half_then_disk_full)
    with pytest.raises(OSError, match="No space"):
        write_report(run, progress=False)
    assert page.read_bytes() == old_page
    for figure in (run / "figures").iterdir():  # whole images, or none
        with Image.open(figure) as im:
            im.load()
    assert not [p for p in run.rglob(".*") if ".tmp-" in p.name]
    monkeypatch.undo()

    arrays = run / "assets" / asset_module.ARRAYS_FILE
    asset_module._save_assets(arrays.parent, {"format": 1}, {"x": np.arange(5)})
    old_arrays = arrays.read_bytes()

    def half_savez(fh, **arrays):
        fh.write(old_arrays[: len(old_arrays) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(asset_module.np, "savez_compressed", half_savez)
    with pytest.raises(OSError, match="No space"):
        asset_module._save_assets(arrays.parent, {"format": 1}, {"x": np.arange(9)})
    assert arrays.read_bytes() == old_arrays
    assert not [p for p in run.rglob(".*") if ".tmp-" in p.name]


def test_save_never_overwrites_a_foreign_file(tmp_path):
    (tmp_path / "channels.csv").write_text("user data\n")
    with pytest.raises(RunDirError, match="overwrite channels.csv.*no pcace run wrote"):
        save_example(tmp_path)
    assert (tmp_path / "channels.csv").read_text() == "user data\n"
    (tmp_path / "channels.csv").unlink()
    (tmp_path / "run.json").write_text('{"mine": 1}')
    with pytest.raises(RunDirError, match="not a pcace run.json"):
        save_example(tmp_path)


def test_save_over_another_run_drops_its_extra_files(tmp_path):
    save_example(tmp_path, run_id="first")
    atomic_write(tmp_path / "figures" / "overview.png", b"png")
    add_files(tmp_path, ["figures"])
    save_example(tmp_path, run_id="first")  # the same run saved again keeps its figures
    assert "figures/overview.png" in read_run(tmp_path).files
    save_example(tmp_path, run_id="second")  # another run: nothing of the first stays
    assert not (tmp_path / "figures" / "overview.png").exists()
    assert "figures/overview.png" not in read_run(tmp_path).files


def test_add_files_needs_existing_files(tmp_path):
    save_example(tmp_path)
    with pytest.raises(RunDirError, match="no such file"):
        add_files(tmp_path, ["report.html"])
    with pytest.raises(RunDirError, match="not a plain relative path"):
        add_files(tmp_path, ["../x"])


# --- (c) verification on load ------------------------------------------------------------------

def test_truncated_file_is_refused_naming_it(tmp_path):
    save_example(tmp_path)
    data = (tmp_path / "channels.csv").read_bytes()
    (tmp_path / "channels.csv").write_bytes(data[: len(data) // 2])
    with pytest.raises(RunDirError, match=r"^channels.csv in .* does not match run.json \("):
        read_run(tmp_path)
    assert "\n" not in str(pytest.raises(RunDirError, read_run, tmp_path).value)


def test_same_size_edit_is_refused(tmp_path):
    save_example(tmp_path)
    data = bytearray((tmp_path / "layers.csv").read_bytes())
    data[-2] = ord("x") if data[-2] != ord("x") else ord("y")
    (tmp_path / "layers.csv").write_bytes(bytes(data))
    with pytest.raises(RunDirError, match="layers.csv .*SHA-256 differs"):
        read_run(tmp_path)


def test_missing_and_unlisted_files(tmp_path):
    save_example(tmp_path)
    (tmp_path / "scores.csv").unlink()
    with pytest.raises(RunDirError, match="scores.csv listed in .* is missing"):
        read_run(tmp_path)
    with pytest.raises(RunDirError, match="does not exist"):
        read_run(tmp_path / "missing_dir")
    (tmp_path / "run.json").unlink()
    with pytest.raises(RunDirError, match="holds no run.json"):
        read_run(tmp_path)


def test_no_run_json_points_at_resume(tmp_path):
    start_checkpoints(tmp_path, {"seed": 0})
    with pytest.raises(RunDirError, match="holds no run.json.*resume=True"):
        read_run(tmp_path)


def test_interrupted_run_loads_labelled(tmp_path):
    save_run(tmp_path, files_for([channel_table("a")]),
             {"pcace_version": "t", "layers": ["a", "b", "c"], "layers_done": ["a"]},
             complete=False)
    run = read_run(tmp_path)
    assert not run.complete and run.verified
    assert run.label == ("interrupted run: 1 of 3 layers scored; to resume it, call rank again "
                         "with the same checkpoint_dir and resume=True")
    from pcace.core.voice import speaking_cli

    with speaking_cli():
        assert run.label == ("interrupted run: 1 of 3 layers scored; to resume it, run the "
                             "same command with --resume")


def test_older_run_json_loads_unverified(tmp_path):
    files_for([channel_table("a")])["channels.csv"].to_csv(tmp_path / "channels.csv")
    (tmp_path / "layers.csv").write_text("layer\na\n")
    (tmp_path / "run.json").write_text(json.dumps({"pcace_version": "0.1",
                                                   "interrupted": False}))
    run = read_run(tmp_path)
    assert run.complete and not run.verified and "not verified" in run.label
    with pytest.raises(RunDirError, match="older pcace"):
        prepare_run_dir(tmp_path, force=True)


def test_corrupt_run_json(tmp_path):
    save_example(tmp_path)
    (tmp_path / "run.json").write_text('{"files": ')
    with pytest.raises(RunDirError, match="cannot be read as JSON"):
        read_run(tmp_path)


# --- (d) checkpoints and resume ----------------------------------------------------------------

SETTINGS = {"weights_sha256": "abc", "layers": ["a", "b", "c"], "seed": 0, "k": 3,
            "bootstrap": 8, "scores_sha256": "def"}


def test_checkpoint_round_trip_is_exact(tmp_path):
    start_checkpoints(tmp_path, SETTINGS)
    table = channel_table("layer1.0.conv1", 6)
    table["note"] = [None, "x", 1.5, None, "y", None]  # an object column of mixed values
    stability = {"spearman_mean": np.float64(0.8), "top": [3, 1], "top_share": {3: 0.5, 1: 1.0},
                 "spearman_sd": float("nan")}
    comps = np.random.default_rng(0).normal(size=(6, 10, 3))
    save_layer_checkpoint(tmp_path, "layer1.0.conv1", table, stability=stability,
                          arrays={"components": comps}, extra={"seconds": 1.25})
    got = load_layer_checkpoints(tmp_path, SETTINGS)["layer1.0.conv1"]
    assert_frame_equal(got.table, table, check_exact=True)
    assert got.stability["top_share"] == {3: 0.5, 1: 1.0}
    assert got.stability["top"] == [3, 1] and np.isnan(got.stability["spearman_sd"])
    assert np.array_equal(got.arrays["components"], comps) and got.extra == {"seconds": 1.25}


def test_resumed_run_ends_identical_to_uninterrupted(tmp_path):
    """Layers a, b finish, the run stops; a resume scores only c; the files are identical."""
    tables = {n: channel_table(n, 5, seed=i) for i, n in enumerate(SETTINGS["layers"])}
    full = tmp_path / "full"
    save_example_tables = files_for(list(tables.values()))
    save_run(prepare_run_dir(full), save_example_tables,
             {"pcace_version": "t", "run_id": "r"})

    part = prepare_run_dir(tmp_path / "part")
    start_checkpoints(part, SETTINGS)
    for name in ("a", "b"):
        save_layer_checkpoint(part, name, tables[name], stability={"top": [0]})
    save_run(part, files_for([tables["a"], tables["b"]]),
             {"pcace_version": "t", "run_id": "r", "layers_done": ["a", "b"]}, complete=False)

    prepare_run_dir(part, resume=True)
    done = load_layer_checkpoints(part, SETTINGS)
    assert list(done) == ["a", "b"] and done["a"].stability == {"top": [0]}
    todo = [n for n in SETTINGS["layers"] if n not in done]
    assert todo == ["c"]
    merged = [done[n].table if n in done else tables[n] for n in SETTINGS["layers"]]
    save_run(part, files_for(merged), {"pcace_version": "t", "run_id": "r"})
    remove_checkpoints(part)
    for name in ("channels.csv", "layers.csv", "scores.csv"):
        assert (part / name).read_bytes() == (full / name).read_bytes(), name
    assert read_run(part).complete and not (part / "checkpoints").exists()


def test_resume_with_other_settings_is_refused(tmp_path):
    start_checkpoints(tmp_path, SETTINGS)
    save_layer_checkpoint(tmp_path, "a", channel_table("a"))
    from pcace.core.voice import speaking_cli

    # the fix in the words of the interface used: Python's, or the command's
    with pytest.raises(RunDirError, match="other settings .*seed.*another checkpoint_dir") as err:
        load_layer_checkpoints(tmp_path, {**SETTINGS, "seed": 1})
    assert "--" not in str(err.value)
    with speaking_cli(), pytest.raises(RunDirError, match="other settings .*seed.*--force"):
        load_layer_checkpoints(tmp_path, {**SETTINGS, "seed": 1})


def test_unreadable_checkpoint_is_skipped(tmp_path):
    start_checkpoints(tmp_path, SETTINGS)
    path = save_layer_checkpoint(tmp_path, "a", channel_table("a"))
    path.write_bytes(path.read_bytes()[:50])
    with pytest.warns(UserWarning, match="scored again"):
        assert load_layer_checkpoints(tmp_path, SETTINGS) == {}


def test_checkpoints_need_a_start(tmp_path):
    with pytest.raises(RunDirError, match="start_checkpoints"):
        save_layer_checkpoint(tmp_path, "a", channel_table("a"))
    assert load_layer_checkpoints(tmp_path, SETTINGS) == {}


def test_killed_run_with_checkpoints_only(tmp_path):
    start_checkpoints(tmp_path, SETTINGS)
    save_layer_checkpoint(tmp_path, "a", channel_table("a"))
    with pytest.raises(RunDirError, match="resume=True"):
        prepare_run_dir(tmp_path)
    assert prepare_run_dir(tmp_path, resume=True) == tmp_path
    prepare_run_dir(tmp_path, force=True)
    assert not any(tmp_path.iterdir())


def test_fingerprint_is_order_free_and_sensitive():
    assert run_fingerprint({"a": 1, "b": [1, 2]}) == run_fingerprint({"b": [1, 2], "a": 1})
    assert run_fingerprint({"a": 1}) != run_fingerprint({"a": 2})


# --- (e) spill directories ---------------------------------------------------------------------

def test_spill_dir_names_its_owner(tmp_path):
    d = make_spill_dir(tmp_path / "spills")
    assert d.is_dir() and d.name.startswith(f"pcace-spill-{os.getpid()}-")
    assert spill_owner(d) == os.getpid()
    assert spill_owner(tmp_path / "pcace-spill-abcdef") is None


def test_clean_stale_spills_removes_only_dead_owners(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f"pcace-spill-{dead_pid}-x1y2z3"
    stale.mkdir()
    (stale / "layer.f32").write_bytes(b"\0" * 64)
    mine = make_spill_dir(tmp_path)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        running = tmp_path / f"pcace-spill-{alive.pid}-a1b2c3"
        running.mkdir()
        legacy = tmp_path / "pcace-spill-q1w2e3"  # an older name without an owner
        legacy.mkdir()
        other = tmp_path / "something-else"
        other.mkdir()
        assert clean_stale_spills(tmp_path) == [stale]
        assert not stale.exists()
        assert mine.exists() and running.exists() and legacy.exists() and other.exists()
    finally:
        alive.kill()
        alive.wait()
    assert clean_stale_spills(tmp_path) == [running]
    assert clean_stale_spills(tmp_path / "absent") == []


def test_preflight_read_only_filesystem(tmp_path, monkeypatch):
    """EROFS (a read-only mount) as the kernel reports it, also when running as root."""

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(common.tempfile, "mkstemp", read_only)
    with pytest.raises(RunDirError, match=r"cannot write in .*\(Read-only file system\)"):
        prepare_run_dir(tmp_path)
