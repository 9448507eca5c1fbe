"""Issue 13, row 11: a run owns its --out folder (lock, no silent overwrite, no silent fresh start, no shrinking
--rounds on resume)."""

import json

import pytest

from fedamole.simulation.cli import main
from fedamole.simulation.presets import make_config
from fedamole.simulation.run_folder import LOCK_NAME, claim_run_folder
from fedamole.simulation.runner import simulate

FAST = ["--preset", "tiny", "--local-steps", "1", "--no-progress"]


def _sim(out, *extra):
    return main(["simulate", *FAST, "--out", str(out), *extra])


def _err(capsys) -> str:
    return capsys.readouterr().err


def test_second_run_on_the_same_out_is_refused_and_overwrite_replaces(tmp_path, capsys):
    out = tmp_path / "run"
    assert _sim(out, "--rounds", "2") == 0
    before = (out / "summary.json").read_bytes()
    assert _sim(out, "--rounds", "1") == 2
    assert "--out" in (err := _err(capsys)) and "is not empty" in err and "--overwrite" in err
    assert (out / "summary.json").read_bytes() == before
    (out / "notes.txt").write_text("mine")
    assert _sim(out, "--rounds", "1", "--overwrite") == 0
    assert json.loads((out / "summary.json").read_text())["rounds"] == 1
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite removes only what a run writes


def test_resume_needs_a_run_to_resume(tmp_path, capsys):
    assert _sim(tmp_path / "typo", "--rounds", "1", "--resume") == 2
    assert "--resume" in _err(capsys)
    assert not (tmp_path / "typo").exists()
    (tmp_path / "empty").mkdir()
    assert _sim(tmp_path / "empty", "--rounds", "1", "--resume") == 2
    assert "holds no fedamole run" in _err(capsys)
    assert _sim(tmp_path / "x", "--rounds", "1", "--resume", "--overwrite") == 2
    assert "--resume" in (err := _err(capsys)) and "--overwrite" in err


def test_resume_with_fewer_rounds_than_done_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert _sim(out, "--rounds", "2") == 0
    assert _sim(out, "--rounds", "1", "--resume") == 2
    assert "--rounds 1 is less than the 2 rounds already done" in _err(capsys)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and len(summary["history"]) == 2
    cfg = make_config("tiny", {"rounds": 1, "local_steps": 1})
    with pytest.raises(ValueError, match=r"rounds \(--rounds\) is 1, .* already holds 2 rounds"):
        simulate(cfg, progress=False, checkpoint_dir=out / "checkpoint", resume=True)


def test_a_locked_folder_is_refused_at_once(tmp_path, capsys):
    out = tmp_path / "run"
    with claim_run_folder(out, ()):
        assert _sim(out, "--rounds", "1") == 2
        assert "in use by another fedamole run" in _err(capsys)
        assert not (out / "summary.json").exists()
    assert _sim(out, "--rounds", "1") == 0  # released: the lock file alone counts as empty
    assert (out / LOCK_NAME).is_file()


def test_resume_of_a_run_killed_before_its_first_round(tmp_path):
    out = tmp_path / "run"
    claim_run_folder(out, ()).release()  # what a run killed during set-up leaves behind
    with claim_run_folder(out, (), resume=True, rounds=1) as folder:
        assert folder.path == out
    (out / "stray.txt").write_text("x")
    with pytest.raises(ValueError, match="holds files but no checkpoint"):
        claim_run_folder(out, (), resume=True)
