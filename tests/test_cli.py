"""`fedamole simulate` / `fedamole compare` write valid summaries and plots."""

import json

import pytest

from fedamole.simulation.cli import main


def test_simulate_tiny_writes_summary_and_plot(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("preset: tiny\nlocal_steps: 2\n")
    rc = main(
        [
            "simulate",
            "--config",
            str(cfg),
            "--rounds",
            "2",
            "--algorithm",
            "fedamole",
            "--engine",
            "sequential",
            "--seed",
            "3",
            "--no-progress",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert rc == 0
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    for key in (
        "algorithm",
        "engine",
        "clients",
        "rounds",
        "metric",
        "final_mean",
        "final_per_client",
        "history",
        "wall_seconds",
    ):
        assert key in s
    assert s["clients"] == 4 and s["rounds"] == 2 and len(s["history"]) == 2
    for h in s["history"]:
        assert {"round", "mean", "per_client", "bytes_up", "bytes_down", "seconds"} <= set(h)
    assert (tmp_path / "run" / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    assert "final_mean" in capsys.readouterr().out


def test_compare_writes_table(tmp_path):
    rc = main(
        [
            "compare",
            "--preset",
            "tiny",
            "--algorithms",
            "fedamole,local",
            "--rounds",
            "1",
            "--local-steps",
            "1",
            "--no-progress",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    table = (tmp_path / "compare.md").read_text()
    assert "| fedamole |" in table and "| local |" in table
    assert json.loads((tmp_path / "compare.json").read_text())["results"].keys() == {"fedamole", "local"}
    assert (tmp_path / "compare.png").exists()


def test_bad_arguments(tmp_path, capsys):
    assert main(["simulate", "--preset", "tiny", "--rounds", "0", "--out", str(tmp_path)]) == 2
    assert "rounds must be an int >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["simulate", "--algorithm", "nope"])
