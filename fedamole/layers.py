"""`MoLELinear`: a frozen nn.Linear plus an adaptive mixture of LoRA experts (SPEC §1), on `mole_lora`."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fedamole.config import MoLEConfig
from fedamole_kernels import mole_lora


def load_balance_from_routing(probs: Tensor, topk_idx: Tensor, active: Tensor) -> Tensor:
    """SPEC §1 load-balance loss of one module and client: ``|S_c| * sum_i P_i f_i``.

    P_i = mean over tokens of probs[:, i]; f_i = share of the (valid) top-k slots routed to expert i.
    probs [T, E] (differentiable), topk_idx [T, k] (-1 = empty slot), active bool [E]. 0 when T = 0.
    """
    valid = topk_idx >= 0
    num_tokens, num_slots = probs.shape
    # Written without data-dependent branches so it costs no host sync and traces under torch.compile.
    counts = torch.zeros(num_slots, dtype=probs.dtype, device=probs.device)
    counts = counts.scatter_add(0, topk_idx.clamp(min=0).reshape(-1), valid.reshape(-1).to(probs.dtype))
    share = counts / valid.sum().clamp(min=1).to(probs.dtype)
    mean_probs = probs.sum(0) / max(num_tokens, 1)
    return active.sum().to(probs.dtype) * (mean_probs * share).sum()


class MoLELinear(nn.Module):
    """Drop-in replacement for an nn.Linear: ``y = base(x) + mole_lora(x, ...)``, base frozen.

    Semantics for x [..., d_in] (d_in = base.in_features) -> y [..., d_out]::

        x_e = dropout(x)                                   # experts only; routing sees x
        delta, probs, idx = mole_lora(x, [0, T], lora_a[None], lora_b[None], router[None],
                                      shared_a[None], shared_b[None], active_experts[None], x_e, top_k, alpha / r)
        y = base(x) + delta

    Parameters: lora_a [E, r, d_in] (Kaiming-uniform, a=sqrt(5)), lora_b [E, d_out, r] (zeros), router [r, d_in]
    ("embedding", the token projection W_t) or [E, d_in] ("linear"), shared_a [r, d_in], shared_b [d_out, r] when
    `config.shared_expert`. Buffer `active_experts` bool [E]: the slots this client holds. They are created in
    the base weight's dtype and device unless `dtype` is given; inputs of another dtype are computed in the
    input's dtype (fp32 accumulation in the kernels). After each forward, `last_load_balance_loss`, `last_probs`
    and `last_topk_idx` hold the routing of that call.
    """

    def __init__(self, base: nn.Linear, config: MoLEConfig, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        if not isinstance(config, MoLEConfig):
            raise TypeError(f"config must be a MoLEConfig, got {type(config).__name__}")
        self.base = base
        self.base.requires_grad_(False)
        self.config = config
        self.in_features, self.out_features = base.in_features, base.out_features
        factory = {"device": base.weight.device, "dtype": dtype or base.weight.dtype}
        num_slots, rank = config.num_experts, config.rank
        self.lora_a = nn.Parameter(torch.empty(num_slots, rank, self.in_features, **factory))
        self.lora_b = nn.Parameter(torch.zeros(num_slots, self.out_features, rank, **factory))
        router_rows = rank if config.router == "embedding" else num_slots
        self.router = nn.Parameter(torch.empty(router_rows, self.in_features, **factory))
        if config.shared_expert:
            self.shared_a = nn.Parameter(torch.empty(rank, self.in_features, **factory))
            self.shared_b = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        else:
            self.register_parameter("shared_a", None)
            self.register_parameter("shared_b", None)
        self.register_buffer("active_experts", torch.ones(num_slots, dtype=torch.bool, device=factory["device"]))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.last_load_balance_loss: Tensor | None = None
        self.last_probs: Tensor | None = None
        self.last_topk_idx: Tensor | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """LoRA initialisation: every A (and the router) Kaiming-uniform(a=sqrt(5)) independently, every B zero."""
        for a in self.lora_a:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_b.zero_()
        nn.init.kaiming_uniform_(self.router, a=math.sqrt(5))
        if self.shared_a is not None:
            nn.init.kaiming_uniform_(self.shared_a, a=math.sqrt(5))
            self.shared_b.zero_()

    @torch.no_grad()
    def set_active_experts(self, mask) -> None:
        """Declare which expert slots exist for this client (bool [E]); others never route nor train."""
        mask = torch.as_tensor(mask, device=self.active_experts.device)
        if mask.dtype != torch.bool or tuple(mask.shape) != tuple(self.active_experts.shape):
            raise ValueError(
                f"mask must be a bool tensor of shape {list(self.active_experts.shape)}, "
                f"got {mask.dtype} {list(mask.shape)}"
            )
        self.active_experts.copy_(mask)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must have last dimension {self.in_features} (in_features), got {tuple(x.shape)}")
        out = self.base(x)
        flat = x.reshape(-1, self.in_features)
        expert_input = None
        if self.training and self.config.dropout > 0:
            expert_input = self.dropout(flat)
        dtype = flat.dtype

        def cast(p: Tensor | None) -> Tensor | None:
            return None if p is None else p.to(dtype)[None]

        delta, probs, topk_idx = mole_lora(
            flat, None, cast(self.lora_a), cast(self.lora_b), cast(self.router), cast(self.shared_a),
            cast(self.shared_b), self.active_experts[None], expert_input,
            top_k=self.config.top_k, scaling=self.config.scaling, router_type=self.config.router,
            backend=self.config.backend,
        )
        self.last_probs, self.last_topk_idx = probs, topk_idx
        self.last_load_balance_loss = load_balance_from_routing(probs, topk_idx, self.active_experts)
        return out + delta.view(*x.shape[:-1], self.out_features).to(out.dtype)

    def extra_repr(self) -> str:
        c = self.config
        return (f"in_features={self.in_features}, out_features={self.out_features}, experts={c.num_experts}, "
                f"rank={c.rank}, top_k={c.top_k}, router={c.router}, shared_expert={c.shared_expert}")
