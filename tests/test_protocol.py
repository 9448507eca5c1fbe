"""`fedamole.fl.protocol`: typed tasks (checked when built, errors naming the field) and results."""

from __future__ import annotations

import dataclasses
import math
import pickle

import numpy as np
import pytest
import torch

from fedamole.fl.client import state_nbytes
from fedamole.fl.protocol import (
    DROPPED,
    FAILED,
    OK,
    RESULT_FIELDS,
    ClientResult,
    ClientTask,
    EmbeddingStats,
    FusionRequest,
)

DOWN = {"m.lora_a": torch.zeros(2, 4, 6), "m.lora_b": torch.zeros(2, 5, 4), "head.weight": torch.zeros(3, 5)}


def test_task_defaults():
    task = ClientTask(down=DOWN)
    assert task.upload == tuple(DOWN)  # None: send back what came down
    assert (task.private, task.keep, task.frozen, task.expert_ids) == ({}, (), (), None)
    assert (task.steps, task.lr, task.batch_size, task.max_grad_norm) == (None, None, None, None)
    assert (task.evaluate, task.stats, task.dp_eta, task.dp_mechanism) == (True, False, None, "gamma-uniform")
    assert (task.optimizer, task.fusion, task.fault, task.router) == ("adam", None, None, "embedding")
    assert ClientTask(down=DOWN, upload=["m.lora_b"], keep=["m.lora_a"]).upload == ("m.lora_b",)
    assert ClientTask(private={"m.lora_a": torch.zeros(1)}, keep=["m.lora_a"]).keep == ("m.lora_a",)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("down", {"m.lora_a": [0.0]}, "ClientTask.down must be a dict"),
        ("private", [torch.zeros(1)], "ClientTask.private must be a dict"),
        ("expert_ids", {"m": [0, 1]}, r"ClientTask.expert_ids\['m'\] must be a 1-D int array"),
        ("expert_ids", {"m": np.zeros(2)}, r"expert_ids\['m'\]"),
        ("expert_ids", [0, 1], "ClientTask.expert_ids must be None or a dict"),
        ("upload", ("m.lora_a", "x.lora_a"), r"ClientTask.upload names keys .*'x.lora_a'"),
        ("keep", "m.lora_a", "ClientTask.keep must be a sequence of state keys"),
        ("frozen", ("weights",), "ClientTask.frozen must be a sequence of kinds"),
        ("frozen", "lora_a", "ClientTask.frozen"),
        ("steps", -1, "ClientTask.steps must be an int >= 0"),
        ("steps", 1.5, "ClientTask.steps"),
        ("steps", True, "ClientTask.steps"),
        ("batch_size", 0, "ClientTask.batch_size must be an int >= 1"),
        ("lr", 0.0, "ClientTask.lr must be a finite number > 0"),
        ("lr", math.nan, "ClientTask.lr"),
        ("lr", "1e-3", "ClientTask.lr"),
        ("max_grad_norm", -1.0, "ClientTask.max_grad_norm"),
        ("dp_eta", math.inf, "ClientTask.dp_eta"),
        ("evaluate", 1, "ClientTask.evaluate must be a bool"),
        ("stats", None, "ClientTask.stats must be a bool"),
        ("dp_mechanism", "laplace", "ClientTask.dp_mechanism must be one of"),
        ("optimizer", "sgd", "ClientTask.optimizer must be one of"),
        ("fault", "meteor", "ClientTask.fault must be one of"),
        ("router", "mlp", "ClientTask.router must be one of"),
        ("fusion", {}, "ClientTask.fusion must be None or a FusionRequest"),
    ],
)
def test_bad_task_fields_are_refused_naming_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        ClientTask(**{"down": DOWN, field: value})


def test_good_values_pass():
    task = ClientTask(
        down=DOWN,
        expert_ids={"m": np.array([3, 7], dtype=np.int32)},
        frozen=("lora_a", "extra"),
        steps=0,
        lr=1e-3,
        batch_size=2,
        max_grad_norm=1.0,
        dp_eta=5.0,
        dp_mechanism="metric-sphere",
        optimizer="adamw",
        fusion=FusionRequest({}),
        fault="crash",
        router="linear",
    )
    assert task.frozen == ("lora_a", "extra") and task.fault == "crash"


def test_tasks_are_frozen_and_settings_fill_only_what_is_unset():
    task = ClientTask(down=DOWN, steps=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        task.steps = 3
    filled = task.with_settings(steps=10, lr=1e-3, batch_size=4, max_grad_norm=None)
    assert (filled.steps, filled.lr, filled.batch_size, filled.max_grad_norm) == (0, 1e-3, 4, None)
    assert task.lr is None  # a new task; the old one is unchanged
    with pytest.raises(ValueError, match="unknown settings"):
        task.with_settings(epochs=2)
    with pytest.raises(ValueError, match="ClientTask.lr"):
        task.with_settings(lr=-1.0)  # replace() checks the filled-in values too


def test_results_statuses():
    ok = ClientResult(up=dict(DOWN), metric=0.5, train_loss=0.1, num_train=3)
    assert ok.ok and ok.status == OK and ok.error is None
    failed = ClientResult.failed("RuntimeError: boom")
    assert not failed.ok and failed.status == FAILED and failed.error == "RuntimeError: boom"
    dropped = ClientResult.dropped()
    assert not dropped.ok and dropped.status == DROPPED and dropped.error is None
    with pytest.raises(ValueError, match="ClientResult.status"):
        ClientResult(status="lost")
    with pytest.raises(ValueError, match="ClientResult.error"):
        ClientResult(status=FAILED)
    with pytest.raises(ValueError, match="ClientResult.error"):
        ClientResult(error="only a failed result has an error")
    assert RESULT_FIELDS[:4] == ("up", "private", "metric", "stats")


def test_tasks_and_results_survive_pickling():
    """Ray ships tasks to actors and results back by pickling."""
    task = ClientTask(down=DOWN, expert_ids={"m": np.array([1, 2])}, fusion=FusionRequest(dict(DOWN)), steps=2)
    back = pickle.loads(pickle.dumps(task))
    assert back.upload == task.upload and back.steps == 2 and np.array_equal(back.expert_ids["m"], [1, 2])
    assert all(torch.equal(back.fusion.private[k], v) for k, v in DOWN.items())
    stats = EmbeddingStats(t={"m": torch.ones(4)}, e={"m": torch.ones(2, 4)})
    result = pickle.loads(pickle.dumps(ClientResult(up=dict(DOWN), stats=stats)))
    assert torch.equal(result.stats.e["m"], stats.e["m"]) and result.ok


def test_statistics_bytes_count():
    stats = EmbeddingStats(t={"m": torch.ones(4)}, e={"m": torch.ones(2, 4)})
    assert state_nbytes(stats) == (4 + 8) * 4
    assert state_nbytes({"m": np.zeros(3, dtype=np.int32)}) == 12
