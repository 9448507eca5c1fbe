"""Issue 13, rows 10 and 14: every command-line and configuration value is checked before any work, and each error
names its field with exit code 2 (``fedamole: error: <field> ...``)."""

import time

import pytest
import torch

from fedamole.simulation.cli import main
from fedamole.simulation.config_checks import MAX_CONFIG_BYTES, SEED_MAX, load_config_file
from fedamole.simulation.presets import make_config

FAST = ["--preset", "tiny", "--rounds", "1", "--local-steps", "1", "--no-progress"]


def _fails(capsys, argv, *needles, within: float = 10.0) -> str:
    start = time.perf_counter()
    assert main(argv) == 2
    assert time.perf_counter() - start < within
    err = capsys.readouterr().err
    assert err.startswith("fedamole: error: "), err
    for needle in needles:
        assert needle in err, err
    return err


def _yaml(tmp_path, text: str | bytes):
    path = tmp_path / "c.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_out_that_is_a_file_fails_before_round_one(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("keep")
    _fails(capsys, ["simulate", *FAST, "--out", str(target)], "--out", "is a file", within=5.0)
    assert target.read_text() == "keep"


@pytest.mark.parametrize(
    "text,needle",
    [
        ("clients: [1,\n", "invalid YAML"),
        ("clients: 4\nclients: 5\n", "duplicate keys ['clients']"),
        ("- just\n- a list\n", "must hold a mapping"),
        ("a: !!python/object:os.system x\n", "invalid YAML"),
        (b"lr: \xff\xfe\n", "not UTF-8"),
        ("x: " + "[" * 40 + "]" * 40 + "\n", "nested deeper than 32"),
    ],
)
def test_bad_config_file_is_named(tmp_path, capsys, text, needle):
    _fails(
        capsys, ["simulate", "--config", str(_yaml(tmp_path, text)), "--out", str(tmp_path / "o")], "--config", needle
    )
    assert not (tmp_path / "o").exists()


def test_missing_and_oversized_config_files(tmp_path, capsys):
    _fails(capsys, ["simulate", "--config", str(tmp_path / "nope.yaml")], "--config", "no such file")
    big = _yaml(tmp_path, "# " + "x" * MAX_CONFIG_BYTES + "\n")
    _fails(capsys, ["simulate", "--config", str(big)], "--config", "bytes")


def test_yaml_alias_bomb_is_refused_before_expansion(tmp_path, capsys):
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i, name in enumerate("bcdefgh"):
        prev = "abcdefg"[i]
        lines.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    bomb = _yaml(tmp_path, "\n".join(lines) + "\n")  # 9**8 = 43 million leaves once expanded
    assert bomb.stat().st_size < 600
    _fails(capsys, ["simulate", "--config", str(bomb)], "--config", "anchors and aliases", within=2.0)


def test_exponent_floats_are_floats(tmp_path):
    data = load_config_file(_yaml(tmp_path, "lr: 1e-9\nmole: {load_balance_coef: 5E-4, alpha: .5e1}\nx: 1e-9x\n"))
    assert data == {"lr": 1e-9, "mole": {"load_balance_coef": 5e-4, "alpha": 5.0}, "x": "1e-9x"}
    cfg = make_config("tiny", {k: v for k, v in data.items() if k != "x"})
    assert cfg.lr == 1e-9 and cfg.mole["load_balance_coef"] == 5e-4


def test_cuda_without_a_gpu_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _fails(
        capsys,
        ["simulate", *FAST, "--device", "cuda", "--out", str(tmp_path / "o")],
        "device: cuda",
        "no usable CUDA GPU",
        within=5.0,
    )
    assert not (tmp_path / "o").exists()


def test_seed_range(tmp_path, capsys):
    _fails(
        capsys,
        ["simulate", *FAST, "--seed", str(10**23), "--out", str(tmp_path / "o")],
        f"seed must be an int >= 0 and <= {SEED_MAX}",
    )
    assert main(["simulate", *FAST, "--seed", str(SEED_MAX), "--out", str(tmp_path / "max")]) == 0


def test_threads_beyond_the_cores_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"^threads \(100000\) must be <= the \d+ CPU cores"):
        make_config("tiny", {"threads": 100000})
    with pytest.raises(ValueError, match=r"^ray.threads \(100000\)"):
        make_config("tiny", {"ray": {"threads": 100000}})


@pytest.mark.parametrize(
    "algorithms,seeds,needle",
    [
        (",", None, "--algorithms must name at least one algorithm"),
        ("local,bogus", None, "--algorithms: unknown ['bogus']"),
        ("local,local", None, "names an algorithm twice"),
        ("local", "1,x", "--seeds must be comma-separated integers"),
        ("local", ",", "--seeds must name at least one seed"),
        ("local,fedamole", "1,-1", "--algorithms local --seeds -1: seed must be an int >= 0"),
    ],
)
def test_compare_arguments_checked_before_any_run(tmp_path, capsys, algorithms, seeds, needle):
    argv = ["compare", *FAST, "--algorithms", algorithms, "--out", str(tmp_path / "o")]
    _fails(capsys, argv + (["--seeds", seeds] if seeds else []), needle, within=5.0)
    assert not (tmp_path / "o").exists()


def test_compare_checks_every_algorithm_before_the_first(tmp_path, capsys):
    cfg = _yaml(tmp_path, "mole: {top_k: 5}\n")  # fine for `local` (one expert), not for fedamole (max_experts 4)
    _fails(
        capsys,
        ["compare", *FAST, "--config", str(cfg), "--algorithms", "local,fedamole", "--out", str(tmp_path / "o")],
        "--algorithms fedamole",
        "mole.top_k (5) must be <= fedamole.max_experts",
        within=5.0,
    )
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "overrides,needle",
    [
        ({"mole": {"top_k": 100}}, r"mole.top_k \(100\) must be <= fedamole.max_experts \(4\)"),
        ({"fedamole": {"num_experts": 3}}, r"fedamole settings .* do not fit 4 clients \(--clients\)"),
        ({"algorithm": "fedamole-homo", "clients": 3, "fedamole": {"num_experts": 8}}, "divisible"),
        ({"data": {"min_samples": 2}}, "data.min_samples must be an int >= 4"),
        ({"data": {"source": "synthetic-gen", "n_per_task": 3}}, "data.n_per_task must be an int >= 4"),
    ],
)
def test_settings_that_fail_later_are_refused_up_front(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        make_config("tiny", overrides)


@pytest.mark.parametrize("clients", [800, 100_000])
def test_too_many_clients_for_the_data_fail_fast(tmp_path, capsys, clients):
    err = _fails(
        capsys,
        ["simulate", *FAST, "--clients", str(clients), "--out", str(tmp_path / "o")],
        f"clients (--clients) is {clients}",
        "synthetic-cls",
        "about 79",
        within=3.0,
    )
    assert "data.min_samples" in err


def test_task_partition_client_limit_is_named():
    with pytest.raises(ValueError, match=r"clients \(--clients\) is 11, .* 10 tasks .* at most 10 clients"):
        make_config("tiny", {"clients": 11, "data": {"source": "synthetic-gen"}})
    with pytest.raises(ValueError, match=r"3 tasks .* at most 3 clients"):
        make_config("tiny", {"data": {"partition": "task"}})


def test_feasible_client_counts_still_pass():
    for clients in (4, 100, 500):
        make_config("tiny", {"clients": clients})
