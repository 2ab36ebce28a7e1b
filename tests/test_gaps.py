"""No quiet gaps (issue 27): skipped images are counted, in one clean line each; a run that
saved nothing leaves nothing behind."""

from __future__ import annotations

import shutil

import pytest

from pcace.cli.main import main


@pytest.fixture
def cifar(shared_dir):
    return shared_dir / "data/cifar10"


def _model(cifar) -> list[str]:
    return ["--model", "pcace.zoo:cifar_resnet20", "--checkpoint",
            str(cifar / "resnet20-12fca82f.th")]


def test_skipped_images_are_counted_in_one_clean_line_each(cifar, tmp_path, capsys):
    folder = tmp_path / "flat"
    folder.mkdir()
    for path in sorted((cifar / "test" / "dog").iterdir())[:28]:
        shutil.copy(path, folder / path.name)
    (folder / "broken.jpg").write_bytes(b"not an image")
    (folder / "empty.png").write_bytes(b"")
    code = main(["rank", *_model(cifar), "--data", str(folder), "--target", "dog",
                 "--layers", "layer3.2.conv2", "--permutations", "9", "--split-half", "0",
                 "--no-progress", "--out", str(tmp_path / "run")])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert out.out.startswith("PCACE over 28 images (2 unreadable images skipped)"), out.out
    warned = [line for line in out.err.splitlines() if "unreadable image" in line]
    assert len(warned) == 2, out.err
    assert all(line.startswith("pcace: warning: skipping unreadable image") for line in warned)
    assert "warnings.warn" not in out.err and "UserWarning" not in out.err, out.err
    assert main(["report", str(tmp_path / "run")]) == 0  # the report counts them too
    html = (tmp_path / "run" / "report.html").read_text(encoding="utf-8")
    assert "<dd>28 (2 unreadable images skipped: broken.jpg, empty.png)</dd>" in html


def test_a_failed_run_leaves_no_empty_out(cifar, tmp_path, capsys):
    out = tmp_path / "never"
    code = main(["rank", *_model(cifar), "--data", str(cifar / "test"), "--class", "cat",
                 "--target", "unicorn", "--no-progress", "--out", str(out)])
    assert code == 2 and "unicorn" in capsys.readouterr().err
    assert not out.exists()
    kept = tmp_path / "mine"
    kept.mkdir()  # a folder the user made stays
    assert main(["rank", *_model(cifar), "--data", str(cifar / "test"), "--class", "cat",
                 "--target", "unicorn", "--no-progress", "--out", str(kept)]) == 2
    assert kept.is_dir() and not any(kept.iterdir())


def test_no_empty_checkpoints_after_a_failure_before_any_layer(cifar, tmp_path, capsys,
                                                               monkeypatch):
    from pcace.run import pipeline

    def fail(*args, **kwargs):
        raise ValueError("failed in the forward pass")

    out = tmp_path / "run"
    monkeypatch.setattr(pipeline, "score_layers", fail, raising=False)
    import pcace.run.passes as passes

    monkeypatch.setattr(passes.Passes, "first", fail)
    code = main(["rank", *_model(cifar), "--data", str(cifar / "test"), "--class", "cat",
                 "--target", "cat", "--limit", "20", "--layers", "layer3.2.conv2",
                 "--no-progress", "--out", str(out)])
    assert code == 2 and "failed in the forward pass" in capsys.readouterr().err
    assert not out.exists()
