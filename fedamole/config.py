"""`MoLEConfig`: the hyper-parameters of an adaptive mixture-of-LoRA-experts layer (SPEC §1)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

ROUTERS = ("embedding", "linear")
BACKENDS = ("reference", "triton", "cuda", "cpu")
# PEFT's default LoRA targets, which the reference setup uses: Llama-style first, then BERT-style.
DEFAULT_TARGETS = (("q_proj", "v_proj"), ("query", "value"))


@dataclass
class MoLEConfig:
    """Hyper-parameters of `MoLELinear`.

    num_experts: routed expert slots per module (E); a client may hold fewer (`MoLELinear.active_experts`).
    rank / alpha: LoRA rank r and alpha; the experts' output is scaled by alpha / r.
    top_k: routed experts per token (all active slots if fewer).
    dropout: dropout on the experts' input only (routing sees the clean input).
    router: "embedding" (FedAMoLE: scores = A_i x . W_t x / sqrt(r)) or "linear" (scores = R x).
    shared_expert: an always-on LoRA pair with weight 1.
    target_modules: names (last path component) of the nn.Linear modules to adapt; None = the first default set
        that matches the model: q_proj,v_proj (Llama-style) or query,value (BERT-style).
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
    target_modules: tuple[str, ...] | None = None
    load_balance_coef: float = 0.001
    backend: str | None = None

    def __post_init__(self) -> None:
        for name in ("num_experts", "rank", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MoLEConfig.{name} must be an int >= 1, got {value!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) \
                or self.alpha <= 0:
            raise ValueError(f"MoLEConfig.alpha must be a finite number > 0, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MoLEConfig.dropout must be a float in [0, 1), got {self.dropout!r}")
        if self.router not in ROUTERS:
            raise ValueError(f"MoLEConfig.router must be one of {ROUTERS}, got {self.router!r}")
        if not isinstance(self.shared_expert, bool):
            raise ValueError(f"MoLEConfig.shared_expert must be a bool, got {self.shared_expert!r}")
        if self.target_modules is not None:
            if isinstance(self.target_modules, str):
                self.target_modules = tuple(t.strip() for t in self.target_modules.split(",") if t.strip())
            self.target_modules = tuple(self.target_modules)
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError(
                    f"MoLEConfig.target_modules must be a non-empty list of module names, got {self.target_modules!r}"
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
        data["target_modules"] = None if self.target_modules is None else list(self.target_modules)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> MoLEConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown MoLEConfig fields {unknown}; allowed: {sorted(known)}")
        return cls(**data)
