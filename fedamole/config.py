"""`MoLEConfig`: the hyper-parameters of an adaptive mixture-of-LoRA-experts layer (SPEC §1)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from fedamole.targets import DEFAULT_TARGETS as DEFAULT_TARGETS
from fedamole.targets import normalize_target_spec

ROUTERS = ("embedding", "linear")
BACKENDS = ("reference", "triton", "cuda", "cpu")


@dataclass
class MoLEConfig:
    """Hyper-parameters of `MoLELinear`.

    num_experts: routed expert slots per module (E); a client may hold fewer (`MoLELinear.active_experts`).
    rank / alpha: LoRA rank r and alpha; the experts' output is scaled by alpha / r.
    top_k: routed experts per token (all active slots if fewer).
    dropout: dropout on the experts' input only (routing sees the clean input).
    router: "embedding" (FedAMoLE: scores = A_i x . W_t x / sqrt(r)) or "linear" (scores = R x).
    shared_expert: an always-on LoRA pair with weight 1.
    target_modules: the modules to adapt, with PEFT's semantics (fedamole.targets): a list of names, each matching
        a module whose full dotted name equals it or ends with "." + it ("q_proj", "self_attn.q_proj"); a str, a
        regex that must match the full name (re.fullmatch), or "all-linear" (every nn.Linear / Conv1D but the
        output or classification head); None = the first default set that matches the model: q_proj,v_proj
        (Llama-style) or query,value (BERT-style). A str with a comma and no regex metacharacter is a list
        ("q_proj, v_proj"); note a single name as a str ("q_proj") is a regex, matching only a top-level module.
    exclude_modules: modules never adapted, among those target_modules matches: a regex str or a list of names,
        same matching (and same comma rule) as target_modules; None excludes nothing.
    load_balance_coef: weight of the summed load-balance losses in the training loss.
    backend: `mole_lora` backend; None picks the fastest for the input's device.
    """

    num_experts: int = 8
    rank: int = 8
    alpha: float = 16.0
    top_k: int = 2
    dropout: float = 0.05
    router: str = "embedding"
    shared_expert: bool = True
    target_modules: str | tuple[str, ...] | None = None
    load_balance_coef: float = 0.001
    backend: str | None = None
    exclude_modules: str | tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("num_experts", "rank", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MoLEConfig.{name} must be an int >= 1, got {value!r}")
        if (
            isinstance(self.alpha, bool)
            or not isinstance(self.alpha, (int, float))
            or not math.isfinite(self.alpha)
            or self.alpha <= 0
        ):
            raise ValueError(f"MoLEConfig.alpha must be a finite number > 0, got {self.alpha!r}")
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not 0.0 <= self.dropout < 1.0
        ):
            raise ValueError(f"MoLEConfig.dropout must be a float in [0, 1), got {self.dropout!r}")
        if self.router not in ROUTERS:
            raise ValueError(f"MoLEConfig.router must be one of {ROUTERS}, got {self.router!r}")
        if not isinstance(self.shared_expert, bool):
            raise ValueError(f"MoLEConfig.shared_expert must be a bool, got {self.shared_expert!r}")
        self.target_modules = normalize_target_spec(self.target_modules, "MoLEConfig.target_modules")
        self.exclude_modules = normalize_target_spec(
            self.exclude_modules, "MoLEConfig.exclude_modules", allow_all_linear=False
        )
        coef = self.load_balance_coef
        if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not math.isfinite(coef) or coef < 0:
            raise ValueError(f"MoLEConfig.load_balance_coef must be a finite number >= 0, got {coef!r}")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"MoLEConfig.backend must be one of {BACKENDS} or None, got {self.backend!r}")

    @property
    def scaling(self) -> float:
        return float(self.alpha) / self.rank

    def to_dict(self) -> dict:
        data = asdict(self)
        for key in ("target_modules", "exclude_modules"):  # JSON: a list of names, a regex / "all-linear" str, or null
            value = getattr(self, key)
            data[key] = list(value) if isinstance(value, tuple) else value
        return data

    @classmethod
    def from_dict(cls, data: dict) -> MoLEConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown MoLEConfig fields {unknown}; allowed: {sorted(known)}")
        return cls(**data)
