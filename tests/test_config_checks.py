"""Every simulation setting is checked, and the message names the field and what it allows."""

import pytest

from fedamole.simulation.cli import main
from fedamole.simulation.presets import PRESETS, make_config

BAD = [
    ({"clientz": 3}, "unknown configuration keys"),
    ({"clients": "ten"}, "clients must be an int"),
    ({"clients": 0}, "clients must be an int >= 1"),
    ({"rounds": 2.5}, "rounds"),
    ({"local_steps": -1}, "local_steps"),
    ({"batch_size": 1.5}, "batch_size"),
    ({"lr": -1}, "lr must be a number > 0"),
    ({"lr_decay": 1.5}, "lr_decay"),
    ({"seed": "x"}, "seed"),
    ({"max_grad_norm": -1}, "max_grad_norm"),
    ({"device": "tpu"}, "device must be one of auto, cpu, cuda"),
    ({"threads": -2}, "threads"),
    ({"eval_initial": "yes"}, "eval_initial must be a bool"),
    ({"cohort_size": -1}, "cohort_size"),
    ({"max_upload_norm": float("inf")}, "max_upload_norm"),
    ({"algorithm": "fedavg"}, "algorithm must be one of"),
    ({"engine": "mpi"}, "engine must be one of"),
    ({"mole": {"rank": 0}}, "mole: MoLEConfig.rank"),
    ({"mole": {"rnk": 3}}, "unknown MoLEConfig fields"),
    ({"mole": {"router": "mlp"}}, "router"),
    ({"model": {"type": "gpt9"}}, "model.type must be one of"),
    ({"model": {"max_length": 0}}, "model.max_length"),
    ({"model": {"type": "hf-causal", "path": None}}, "model.path is required"),
    ({"model": {"dtype": "float8"}}, "model.dtype"),
    ({"data": {"source": "mars"}}, "data.source must be one of"),
    ({"data": {"alpha": -1}}, "data.alpha"),
    ({"data": {"num_labels": 1}}, "data.num_labels"),
    ({"data": {"colour": 1}}, "unknown data settings"),
    ({"fedamole": {"num_experts": 0}}, "fedamole.num_experts"),
    ({"fedamole": {"num_expert": 3}}, "unknown fedamole settings"),
    ({"fedamole": {"min_experts": 9}}, "min_experts"),
    ({"fedamole": {"dp_eta": 0}}, "dp_eta"),
    ({"fdlora": {"sync_every": 0}}, "fdlora.sync_every"),
    ({"fdlora": {"outer_momentum": 2}}, "outer_momentum"),
    ({"ray": {"num_actors": 0}}, "ray.num_actors"),
    ({"ray": {"cpus_per_actor": 0}}, "ray.cpus_per_actor"),
    ({"faults": [{"round": 1, "client": 0, "kind": "meteor"}]}, "faults"),
]


@pytest.mark.parametrize("overrides,needle", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_setting_is_named(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        make_config("tiny", overrides)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_are_valid(preset):
    make_config(preset)


def test_cli_reports_bad_config_cleanly(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("clients: 0\n")
    assert main(["simulate", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "clients must be an int >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["simulate", "--engine", "mpi"])
    cfg.write_text("- just\n- a list\n")
    assert main(["simulate", "--config", str(cfg)]) == 2
    assert "fedamole: error: --config" in (err := capsys.readouterr().err) and "mapping" in err
