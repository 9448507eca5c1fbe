"""FDLoRA as the FedAMoLE authors ran it as a baseline (their ``baselines/`` code, SPEC §3).

Every client trains one LoRA (+ head), starting each round from the global LoRA, with AdamW (PyTorch's defaults
but the learning rate and eps 1e-6, i.e. weight decay 0.01). Then:

* outer step, every round: the server treats the plain mean over clients of (global - local) as a gradient and
  takes one Nesterov-SGD step on the global LoRA (lr 1.0, momentum 0.5), exactly PyTorch's
  ``SGD(nesterov=True, dampening=0)`` (`nesterov_outer_step`);
* private copy: every ``sync_every`` rounds (the authors' rounds 0, 5, 10, ...) each client keeps a copy of the
  LoRA it has just trained; it never leaves the client;
* AdaFusion, every round after the outer step: each client searches two weights w in [-bound, bound]^2 for the
  fused adapter ``w0 * global + w1 * private`` (every tensor: A, B and the head) minimising the mean task loss over a
  few batches of its held-out set plus ``penalty * mean(|w|)``, with nevergrad's NGOpt from w = (0, 0) and a budget
  of 5 evaluations; the client is scored with the fused adapter, which is not kept (next round trains from the
  global LoRA again).

Round mapping: with ``warmup_round=True`` (the authors' protocol) round 1 is their local warm-up: clients train
from the common initial LoRA, the server sets the global LoRA to the plain mean (and starts the outer optimiser
afresh) and the round is scored with that averaged model (no private copy exists yet); round r >= 2 is their round
r - 2. With ``warmup_round=False`` round r is their round r - 1 and the first outer step starts from the initial LoRA.

Differences from the authors' code, for a cleaner search: every candidate weight pair is scored on the same
batches (theirs draws the next batches from a persistent iterator for each candidate), in eval mode (theirs leaves
dropout on), and the best candidate evaluated is kept. The held-out set is the client's embedding split (the
authors' 5 % "aux" split of the training data plays that role for them).
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from fedamole.config import MoLEConfig
from fedamole.fl.aggregation import mean_states
from fedamole.fl.algorithm import Algorithm, check_keys
from fedamole.fl.baselines import initial_lora_state, single_lora_config
from fedamole.fl.protocol import ClientResult, ClientTask, FusionRequest

__all__ = [
    "FDLoRA",
    "FusionRequest",
    "nesterov_outer_step",
    "fusion_penalty",
    "fuse_states",
    "search_fusion_weights",
    "adafusion",
]


def nesterov_outer_step(
    glob: dict[str, Tensor], local_mean: dict[str, Tensor], momentum: dict[str, Tensor], lr: float, mu: float
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """One Nesterov-SGD step on the global state with gradient g = glob - local_mean.

    PyTorch's rule (dampening 0): buf = mu * buf + g (buf starts at 0, so the first buf is g), then
    glob - lr * (g + mu * buf). Returns the new (global state, momentum buffers)."""
    new_glob, new_mom = {}, {}
    for k, g_val in glob.items():
        grad = g_val - local_mean[k].to(g_val.dtype)
        buf = mu * momentum[k] + grad
        new_mom[k] = buf
        new_glob[k] = g_val - lr * (grad + mu * buf)
    return new_glob, new_mom


def fusion_penalty(weights: np.ndarray, coef: float) -> float:
    """The authors' L1 term: coef x the mean absolute fusion weight."""
    w = np.asarray(weights, dtype=np.float64)
    return float(coef * np.abs(w).mean())


def fuse_states(weights, states: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """sum_i weights[i] * states[i], key by key (the states share their keys)."""
    if len(weights) != len(states):
        raise ValueError(f"weights: expected {len(states)} numbers, got {len(weights)}")
    return {k: sum(float(w) * s[k].float() for w, s in zip(weights, states)) for k in states[0]}


def search_fusion_weights(
    objective: Callable[[np.ndarray], float], num: int = 2, budget: int = 5, bound: float = 1.5, seed: int = 0
) -> tuple[np.ndarray, float, list[tuple]]:
    """Minimise ``objective(w)`` over w in [-bound, bound]^num with nevergrad's NGOpt (gradient-free), starting
    at w = 0, with ``budget`` evaluations. Returns (best w evaluated, its value, [(w, value), ...] in order)."""
    try:
        import nevergrad as ng
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise RuntimeError("FDLoRA's AdaFusion needs nevergrad: pip install 'fedamole[fdlora]'") from exc
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be an int >= 1, got {budget!r}")
    if not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"bound must be a finite number > 0, got {bound!r}")
    param = ng.p.Array(init=np.zeros(num), lower=-bound, upper=bound)
    param.random_state = np.random.RandomState(int(seed) % 2**32)
    optimizer = ng.optimizers.NGOpt(parametrization=param, budget=budget, num_workers=1)
    history: list[tuple] = []
    with warnings.catch_warnings():
        # NGOpt's small-budget choice wraps scipy's COBYLA, which warns about its own default tolerances.
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(budget):
            cand = optimizer.ask()
            w = np.asarray(cand.value, dtype=np.float64)
            value = float(objective(w.copy()))
            optimizer.tell(cand, value)
            history.append((w, value))
    best = min(range(len(history)), key=lambda i: history[i][1])
    return history[best][0], history[best][1], history


@torch.no_grad()
def adafusion(
    workload, glob: dict[str, Tensor], request: FusionRequest, examples, batch_size: int, seed: int
) -> np.ndarray:
    """AdaFusion of ``glob`` and ``request.private`` for one client; leaves the model holding the fused state and
    returns the chosen weights (w_global, w_private)."""
    from fedamole.fl.client import load_state

    if set(request.private) != set(glob):
        raise ValueError(
            f"fusion: the private copy's keys differ from the global state's: "
            f"{sorted(set(request.private) ^ set(glob))[:4]}"
        )
    model = workload.model
    was_training = model.training
    model.eval()
    rng = np.random.default_rng(seed)
    batches = list(workload.batches(examples, batch_size, steps=request.batches, rng=rng)) if examples else []
    states = [glob, request.private]
    dtypes = {k: v.dtype for k, v in glob.items()}

    def load(weights) -> None:
        load_state(model, {k: v.to(dtypes[k]) for k, v in fuse_states(weights, states).items()})

    def objective(weights: np.ndarray) -> float:
        load(weights)
        loss = float(np.mean([float(workload.task_loss(b)) for b in batches])) if batches else 0.0
        return loss + fusion_penalty(weights, request.penalty)

    try:
        best, _, _ = search_fusion_weights(objective, 2, request.budget, request.bound, seed)
        load(best)
    finally:
        model.train(was_training)
    return best


class FDLoRA(Algorithm):
    """FDLoRA (see the module docstring). State: the global LoRA (``glob``), the outer optimiser's momentum
    (``momentum``) and the clients' private copies (``private``, None before a client's first copy)."""

    STATE = ("glob", "momentum", "private")

    name = "fdlora"
    evaluates_global = True

    def __init__(
        self,
        sync_every: int = 5,
        outer_lr: float = 1.0,
        outer_momentum: float = 0.5,
        warmup_round: bool = True,
        fusion_budget: int = 5,
        fusion_bound: float = 1.5,
        fusion_penalty: float = 0.05,
        fusion_batches: int = 5,
    ) -> None:
        for key, value in (
            ("sync_every", sync_every),
            ("fusion_budget", fusion_budget),
            ("fusion_batches", fusion_batches),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"fdlora.{key} must be an int >= 1, got {value!r}")
        for key, value in (("outer_lr", outer_lr), ("fusion_bound", fusion_bound)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"fdlora.{key} must be a finite number > 0, got {value!r}")
        if not 0 <= outer_momentum <= 1:
            raise ValueError(f"fdlora.outer_momentum must be in [0, 1], got {outer_momentum!r}")
        if not (math.isfinite(fusion_penalty) and fusion_penalty >= 0):
            raise ValueError(f"fdlora.fusion_penalty must be a finite number >= 0, got {fusion_penalty!r}")
        if importlib.util.find_spec("nevergrad") is None:
            raise ValueError("algorithm fdlora needs nevergrad for AdaFusion: pip install 'fedamole[fdlora]'")
        self.sync_every, self.outer_lr, self.outer_momentum = sync_every, float(outer_lr), float(outer_momentum)
        self.warmup_round = bool(warmup_round)
        self.fusion_budget, self.fusion_bound = fusion_budget, float(fusion_bound)
        self.fusion_penalty, self.fusion_batches = float(fusion_penalty), fusion_batches

    def mole_config(self, base: MoLEConfig) -> MoLEConfig:
        return single_lora_config(base)

    def setup(self, model, num_train: list[int], seed: int) -> None:
        self.num_clients = len(num_train)
        self.glob = initial_lora_state(model, seed)
        self.momentum = {k: torch.zeros_like(v) for k, v in self.glob.items()}
        self.private: list[dict | None] = [None] * self.num_clients
        self.state_keys = tuple(self.glob)

    def check_state(self) -> None:
        """The global LoRA and the momentum hold exactly the initial keys; one private copy (or None) per client,
        each with those keys."""
        check_keys("glob", self.glob, self.state_keys)
        check_keys("momentum", self.momentum, self.state_keys)
        if not isinstance(self.private, list) or len(self.private) != self.num_clients:
            raise ValueError(f"private must be a list of {self.num_clients} entries (a state or None)")
        for c, private in enumerate(self.private):
            if private is not None:
                check_keys(f"private[{c}]", private, self.state_keys)

    def _is_warmup(self, round_idx: int) -> bool:
        return self.warmup_round and round_idx == 1

    def refreshes_private(self, round_idx: int) -> bool:
        """Whether clients keep a private copy of the LoRA they train in ``round_idx`` (authors' round % sync)."""
        if self._is_warmup(round_idx):
            return False
        return (round_idx - (2 if self.warmup_round else 1)) % self.sync_every == 0

    def payloads(self, round_idx: int) -> list[ClientTask]:
        keep = tuple(self.glob) if self.refreshes_private(round_idx) else ()
        return [
            ClientTask(
                down=dict(self.glob),
                private={},
                upload=tuple(self.glob),
                keep=keep,
                evaluate=False,
                stats=False,
                optimizer="adamw",
            )
            for _ in range(self.num_clients)
        ]

    def aggregate(self, round_idx: int, uploads: list[ClientResult | None]) -> None:
        """Private copies from the clients that kept one; then the warm-up mean or the outer Nesterov step over the
        clients that uploaded (``None``: failed, dropped out or rejected)."""
        live = [c for c, u in enumerate(uploads) if u is not None]
        for c in live:
            if uploads[c].private:
                self.private[c] = uploads[c].private
        if not live:
            return
        local_mean = mean_states([uploads[c].up for c in live])
        if self._is_warmup(round_idx):
            self.glob = {k: v.to(self.glob[k].dtype) for k, v in local_mean.items()}
            self.momentum = {k: torch.zeros_like(v) for k, v in self.glob.items()}
            return
        self.glob, self.momentum = nesterov_outer_step(
            self.glob, local_mean, self.momentum, self.outer_lr, self.outer_momentum
        )

    def eval_payloads(self) -> list[ClientTask]:
        out = []
        for c in range(self.num_clients):
            fusion = None
            if self.private[c] is not None:
                fusion = FusionRequest(
                    self.private[c], self.fusion_budget, self.fusion_bound, self.fusion_penalty, self.fusion_batches
                )
            out.append(
                ClientTask(down=dict(self.glob), upload=(), keep=(), steps=0, evaluate=True, stats=False, fusion=fusion)
            )
        return out
