"""The client protocol: what the server sends a client for one round (`ClientTask`) and what comes back
(`ClientResult`, with `EmbeddingStats`).

A *state* is a flat dict ``{key: tensor}`` in the layout of `fedamole.adapter_state`. A task is checked when it is
built (every field, errors name it), because the server builds it; a result is not, because it comes from a client
that may be faulty or malicious: the server screens it (`fedamole.simulation.validation.check_upload`) and never
trusts its fields before that.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields, replace

import numpy as np
from torch import Tensor

from fedamole.adapter_state import EXTRA_KIND, MOLE_KINDS
from fedamole.config import ROUTERS

__all__ = [
    "ClientResult",
    "ClientTask",
    "DP_MECHANISMS",
    "DROPPED",
    "EmbeddingStats",
    "FAILED",
    "FusionRequest",
    "OK",
    "OPTIMIZERS",
    "RESULT_FIELDS",
    "TASK_SETTINGS",
    "TRAINING_FAULTS",
]

DP_MECHANISMS = ("gamma-uniform", "metric-sphere")  # noise on the statistics, see `fedamole.fl.dp`
OPTIMIZERS = ("adam", "adamw")  # local optimiser: Adam, or PyTorch's AdamW (weight decay 0.01)
TRAINING_FAULTS = ("crash", "dropout", "diverge")  # faults a client injects into its own round (tests and drills)
TASK_SETTINGS = ("steps", "lr", "batch_size", "max_grad_norm")  # filled by the simulation where None
OK, FAILED, DROPPED = "ok", "failed", "dropped"
_STATUSES = (OK, FAILED, DROPPED)
_FROZEN_KINDS = (*MOLE_KINDS, EXTRA_KIND)


@dataclass(frozen=True)
class FusionRequest:
    """What a client needs for FDLoRA's AdaFusion (`fedamole.fl.fdlora.adafusion`): its private copy and the search
    settings."""

    private: dict[str, Tensor]
    budget: int = 5
    bound: float = 1.5
    penalty: float = 0.05
    batches: int = 5


@dataclass(frozen=True)
class EmbeddingStats:
    """A client's embedding-set statistics per module (SPEC §3 step 4): ``t`` {module: [r]} (embedding router) or
    {module: [d_in]} (linear router), ``e`` {module: [k, r]} (embedding router; empty for the linear router)."""

    t: dict[str, Tensor]
    e: dict[str, Tensor]


def _fail(name: str, expected: str, value) -> ValueError:
    return ValueError(f"ClientTask.{name} must be {expected}, got {value!r}")


def _check_state(name: str, value) -> None:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in value.items()):
        raise _fail(name, "a dict {key: tensor}", type(value).__name__ if not isinstance(value, dict) else value)


def _keys(name: str, value, known) -> tuple[str, ...]:
    if isinstance(value, str) or not all(isinstance(k, str) for k in value):
        raise _fail(name, "a sequence of state keys", value)
    unknown = [k for k in value if k not in known]
    if unknown:
        raise ValueError(f"ClientTask.{name} names keys that neither down nor private holds: {unknown[:4]}")
    return tuple(value)


def _check_number(name: str, value, low: float, integer: bool = False, strict: bool = False) -> None:
    """`value` is None or a number >= `low` (> `low` when `strict`), an int when `integer`."""
    if value is None:
        return
    kind = numbers.Integral if integer else numbers.Real
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, kind)
        or not math.isfinite(value)
        or value < low
        or (strict and value == low)
    ):
        what = f"{'an int' if integer else 'a finite number'} {'>' if strict else '>='} {low}"
        raise _fail(name, what + " or None", value)


def _check_choice(name: str, value, choices: tuple, optional: bool = False) -> None:
    if not (value is None and optional) and value not in choices:
        raise _fail(name, f"one of {choices}" + (" or None" if optional else ""), value)


def _check_expert_ids(value) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise _fail("expert_ids", "None or a dict {module: 1-D int array}", value)
    for module, ids in value.items():
        if not isinstance(ids, np.ndarray) or ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise _fail(f"expert_ids[{module!r}]", "a 1-D int array", ids)


@dataclass(frozen=True)
class ClientTask:
    """One client's work for one round, as the server sends it (every field checked when built).

    down: the state sent by the server (counted as downloaded bytes); private: the state the client kept from
    earlier rounds (not exchanged); expert_ids: {module: int array} of the experts held (metadata, counted);
    upload: keys of the trained state to send back (None: the keys of ``down``); keep: keys to keep privately;
    frozen: tensor kinds not trained (`fedamole.adapter_state` kinds, "extra" for the head).
    steps, lr, batch_size, max_grad_norm: local training; None is the simulation's setting (`with_settings`), and
    a task run with None trains 0 steps, batch size 1, without clipping (lr is needed once steps > 0).
    evaluate: score the test split after training; stats: compute embedding-set statistics; dp_eta: noise level on
    them (None: none) with dp_mechanism (`DP_MECHANISMS`); optimizer: one of `OPTIMIZERS`; fusion: FDLoRA's
    AdaFusion before evaluation (`FusionRequest`); fault: a fault the client injects (`TRAINING_FAULTS`); router:
    the clients' router kind ("embedding" or "linear": the shapes of the statistics).
    """

    down: dict[str, Tensor] = field(default_factory=dict)
    private: dict[str, Tensor] = field(default_factory=dict)
    expert_ids: dict[str, np.ndarray] | None = None
    upload: tuple[str, ...] | None = None
    keep: tuple[str, ...] = ()
    frozen: tuple[str, ...] = ()
    steps: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    max_grad_norm: float | None = None
    evaluate: bool = True
    stats: bool = False
    dp_eta: float | None = None
    dp_mechanism: str = "gamma-uniform"
    optimizer: str = "adam"
    fusion: FusionRequest | None = None
    fault: str | None = None
    router: str = "embedding"

    @property
    def state(self) -> dict[str, Tensor]:
        """The client's whole starting state: what it kept (``private``) overlaid by what the server sent."""
        return {**self.private, **self.down}

    def __post_init__(self) -> None:
        _check_state("down", self.down)
        _check_state("private", self.private)
        _check_expert_ids(self.expert_ids)
        known = self.state
        upload = tuple(self.down) if self.upload is None else _keys("upload", self.upload, known)
        object.__setattr__(self, "upload", upload)
        object.__setattr__(self, "keep", _keys("keep", self.keep, known))
        if isinstance(self.frozen, str) or any(k not in _FROZEN_KINDS for k in self.frozen):
            raise _fail("frozen", f"a sequence of kinds among {_FROZEN_KINDS}", self.frozen)
        object.__setattr__(self, "frozen", tuple(self.frozen))
        _check_number("steps", self.steps, 0, integer=True)
        _check_number("batch_size", self.batch_size, 1, integer=True)
        for name in ("lr", "max_grad_norm", "dp_eta"):
            _check_number(name, getattr(self, name), 0, strict=True)
        for name in ("evaluate", "stats"):
            if not isinstance(getattr(self, name), bool):
                raise _fail(name, "a bool", getattr(self, name))
        _check_choice("dp_mechanism", self.dp_mechanism, DP_MECHANISMS)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("fault", self.fault, TRAINING_FAULTS, optional=True)
        _check_choice("router", self.router, ROUTERS)
        if self.fusion is not None and not isinstance(self.fusion, FusionRequest):
            raise _fail("fusion", "None or a FusionRequest", self.fusion)

    def with_settings(self, **settings) -> ClientTask:
        """This task with the simulation's `TASK_SETTINGS` (steps, lr, batch_size, max_grad_norm) wherever the
        algorithm left them None."""
        unknown = sorted(set(settings) - set(TASK_SETTINGS))
        if unknown:
            raise ValueError(f"with_settings: unknown settings {unknown}; allowed: {list(TASK_SETTINGS)}")
        return replace(self, **{k: v for k, v in settings.items() if getattr(self, k) is None})


@dataclass(frozen=True)
class ClientResult:
    """What comes back from one client's round. ``status`` "ok": the upload — up (the trained state, keys
    ``task.upload``), private (kept state, keys ``task.keep``), metric (None when not asked), stats (None when not
    asked), train_loss (NaN without a local step), num_train, expert_ids (the experts the client held), fusion_weights
    (FDLoRA's AdaFusion weights, reported only). "failed": the client raised (``error`` says what); "dropped": it
    dropped out; the other fields then mean nothing.

    Not checked when built: a client may send anything, which the server screens field by field."""

    up: dict[str, Tensor] = field(default_factory=dict)
    private: dict[str, Tensor] = field(default_factory=dict)
    metric: float | None = None
    stats: EmbeddingStats | None = None
    train_loss: float = math.nan
    num_train: int = 0
    expert_ids: dict[str, np.ndarray] | None = None
    fusion_weights: list[float] | None = None
    status: str = OK
    error: str | None = None

    def __post_init__(self) -> None:
        if self.status not in _STATUSES:
            raise ValueError(f"ClientResult.status must be one of {_STATUSES}, got {self.status!r}")
        if (self.status == FAILED) != isinstance(self.error, str):
            raise ValueError(f"ClientResult.error must be a str exactly when status is {FAILED!r}, got {self.error!r}")

    @property
    def ok(self) -> bool:
        """Whether the client did its round (failed and dropped results carry no upload)."""
        return self.status == OK

    @classmethod
    def failed(cls, error: str) -> ClientResult:
        """A client whose round raised `error` (its type and message)."""
        return cls(status=FAILED, error=str(error))

    @classmethod
    def dropped(cls) -> ClientResult:
        """A client that dropped out of the round."""
        return cls(status=DROPPED)


RESULT_FIELDS = tuple(f.name for f in fields(ClientResult))
