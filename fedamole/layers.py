"""`MoLELinear`: a frozen nn.Linear plus an adaptive mixture of LoRA experts (SPEC §1), on `mole_lora`."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fedamole.config import MoLEConfig
from fedamole_kernels import mole_lora


def load_balance_from_routing(probs: Tensor, topk_idx: Tensor, active: Tensor,
                              token_mask: Tensor | None = None, per_client: bool = False) -> Tensor:
    """SPEC §1 load-balance loss of one module: ``|S_c| * sum_i P_i f_i`` per client, summed over clients.

    P_i = mean over the client's tokens of probs[:, i]; f_i = share of its (valid) top-k slots routed to expert i.
    probs [T, E] (differentiable), topk_idx [T, k] (-1 = empty slot), active bool [E] (one client) or [S, E]
    (S clients whose tokens are S equal consecutive blocks of T). `token_mask` [T] (bool) restricts both means
    to real tokens (padding excluded), so the loss does not depend on how a batch was padded. 0 when no tokens.
    `per_client=True` returns the [S] per-client losses instead of their sum.
    """
    active = active.reshape(-1, active.shape[-1])
    num_clients, num_slots = active.shape
    tokens_per_client = probs.shape[0] // num_clients
    weight = probs.new_ones(probs.shape[0]) if token_mask is None else token_mask.reshape(-1).to(probs.dtype)
    if weight.shape[0] != probs.shape[0]:
        raise ValueError(f"token_mask must have {probs.shape[0]} entries (one per token), got {weight.shape[0]}")
    weight = weight.reshape(num_clients, tokens_per_client)
    probs = probs.reshape(num_clients, tokens_per_client, num_slots)
    topk_idx = topk_idx.reshape(num_clients, tokens_per_client, topk_idx.shape[-1])
    valid = (topk_idx >= 0).to(probs.dtype) * weight[..., None]
    # Written without data-dependent branches so it costs no host sync and traces under torch.compile.
    counts = torch.zeros(num_clients, num_slots, dtype=probs.dtype, device=probs.device)
    counts = counts.scatter_add(1, topk_idx.clamp(min=0).reshape(num_clients, -1), valid.reshape(num_clients, -1))
    share = counts / valid.reshape(num_clients, -1).sum(1, keepdim=True).clamp(min=1)
    mean_probs = (probs * weight[..., None]).sum(1) / weight.sum(1, keepdim=True).clamp(min=1)
    losses = active.sum(1).to(probs.dtype) * (mean_probs * share).sum(1)
    return losses if per_client else losses.sum()


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

    @property
    def last_load_balance_loss(self) -> Tensor | None:
        """SPEC §1 load-balance loss of the last forward (all tokens count), or None before any forward.

        Derived on access from `last_probs`/`last_topk_idx`: training loops that mask padding call
        `load_balance_from_routing(..., token_mask)` instead, so the forward itself pays nothing for it."""
        if self.last_probs is None:
            return None
        return load_balance_from_routing(self.last_probs, self.last_topk_idx, self.active_experts)

    @property
    def num_clients(self) -> int | None:
        """None for the usual single-client layer; S when the expert tensors are stacked for S clients."""
        return self.lora_a.shape[0] if self.lora_a.dim() == 4 else None

    def forward(self, x: Tensor) -> Tensor:
        """y = base(x) + routed experts. With client-stacked experts (lora_a [S, E, r, d_in], active_experts
        [S, E], as the cohort engine sets them), x's leading dimension is split into S equal blocks, block s
        being client s's micro-batch: one `mole_lora` call serves every client."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must have last dimension {self.in_features} (in_features), got {tuple(x.shape)}")
        out = self.base(x)
        flat = x.reshape(-1, self.in_features)
        expert_input = None
        if self.training and self.config.dropout > 0:
            expert_input = self.dropout(flat)
        dtype = flat.dtype
        num_clients = self.num_clients
        if num_clients is None:
            seg_offsets, mask = None, self.active_experts[None]

            def cast(p: Tensor | None) -> Tensor | None:
                return None if p is None else p.to(dtype)[None]
        else:
            if x.dim() < 2 or x.shape[0] % num_clients:
                raise ValueError(f"x's leading dimension must split into {num_clients} client blocks, got shape "
                                 f"{tuple(x.shape)}")
            seg_offsets = torch.arange(num_clients + 1, device=x.device) * (flat.shape[0] // num_clients)
            mask = self.active_experts

            def cast(p: Tensor | None) -> Tensor | None:
                return None if p is None else p.to(dtype)

        delta, probs, topk_idx = mole_lora(
            flat, seg_offsets, cast(self.lora_a), cast(self.lora_b), cast(self.router), cast(self.shared_a),
            cast(self.shared_b), mask, expert_input,
            top_k=self.config.top_k, scaling=self.config.scaling, router_type=self.config.router,
            backend=self.config.backend, check_offsets=False,
        )
        self.last_probs, self.last_topk_idx = probs, topk_idx
        return out + delta.view(*x.shape[:-1], self.out_features).to(out.dtype)

    def extra_repr(self) -> str:
        c = self.config
        return (f"in_features={self.in_features}, out_features={self.out_features}, experts={c.num_experts}, "
                f"rank={c.rank}, top_k={c.top_k}, router={c.router}, shared_expert={c.shared_expert}")
