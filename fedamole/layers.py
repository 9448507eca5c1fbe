"""`MoLELinear`: a frozen linear layer plus an adaptive mixture of LoRA experts (SPEC §1), on `mole_lora`.

`MoLEExperts` is the adapter alone (experts, router, shared expert: ``x -> delta``); `MoLELinear` is a
`MoLEExperts` with its frozen base layer, the drop-in module that `inject_mole` puts into models. The PEFT tuner
(`fedamole.peft_tuner`) holds one `MoLEExperts` per adapter name.
"""

from __future__ import annotations

import collections
import math

import torch
from torch import Tensor, nn

from fedamole.config import MoLEConfig
from fedamole.dropout import FastDropout
from fedamole.routing import load_balance_from_routing, record_routing, release_reentrant_term
from fedamole_kernels import resolve_backend
from fedamole_kernels.backends import get_backend
from fedamole_kernels.mole_lora import mole_lora_prevalidated

__all__ = ["MoLEExperts", "MoLELinear", "base_features", "load_balance_from_routing", "record_routing"]

_OFFSETS_CACHE_SIZE = 16


def base_features(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a layer MoLE can adapt: nn.Linear, or transformers' Conv1D (GPT-2 style,
    weight stored [in, out]). Anything else raises TypeError naming the type."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    weight = getattr(base, "weight", None)
    if type(base).__name__ == "Conv1D" and hasattr(base, "nf") and isinstance(weight, Tensor) and weight.dim() == 2:
        return int(weight.shape[0]), int(weight.shape[1])
    raise TypeError(
        f"base must be an nn.Linear or a transformers Conv1D (GPT-2 style), got {type(base).__name__}; other layer "
        "types (convolutions, embeddings, quantised linears) are not supported"
    )


class MoLEExperts(nn.Module):
    """The mixture-of-LoRA-experts adapter of one linear layer: ``delta = mole_lora(x, ...)`` (SPEC §1).

    Semantics for x [T, d_in] -> delta [T, d_out] in x's dtype::

        x_e = dropout(x)                                   # experts only; routing sees x
        delta, probs, idx = mole_lora(x, [0, T], lora_a[None], lora_b[None], router[None],
                                      shared_a[None], shared_b[None], active_experts[None], x_e, top_k, alpha / r)

    Parameters: lora_a [E, r, d_in] (Kaiming-uniform, a=sqrt(5)), lora_b [E, d_out, r] (zeros), router [r, d_in]
    ("embedding", the token projection W_t) or [E, d_in] ("linear"), shared_a [r, d_in], shared_b [d_out, r] when
    `config.shared_expert`. Buffer `active_experts` bool [E]: the slots this client holds. Inputs of another dtype
    than the weights are computed in the input's dtype (fp32 accumulation in the kernels); under `torch.autocast`
    the op runs in the autocast dtype, as nn.Linear does.

    Many clients in one batch (the cohort engine): inside `fedamole.segments.use_segments(model, weights, plan)` the
    module reads client-stacked tensors (lora_a [S, E, r, d_in], ..., active [S, E]) owned by the caller and gives
    client s the rows the `SegmentPlan` names; one `mole_lora` call serves every client.

    Routing results are not kept on the module: open `fedamole.record_routing(model)` to collect them (probs, top-k
    ids) for the load-balance loss; `get_mole_model` does that around every forward.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        config: MoLEConfig,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(config, MoLEConfig):
            raise TypeError(f"config must be a MoLEConfig, got {type(config).__name__}")
        self.config = config
        self.in_features, self.out_features = int(in_features), int(out_features)
        factory = {"device": device, "dtype": dtype}
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
        self.register_buffer("active_experts", torch.ones(num_slots, dtype=torch.bool, device=device))
        self.dropout = FastDropout(config.dropout) if config.dropout > 0 else nn.Identity()
        # Per-call state is plain Python (no tensors with autograd history), so deepcopy/pickle work at any time.
        self._routing_recorders: tuple = ()
        self._reentrant_cells: collections.deque = collections.deque()
        self._offsets: dict[tuple, Tensor] = {}
        self._backends: dict[tuple, str] = {}
        self._fused: dict[tuple, object] = {}
        # ids of checked weight tuples -> all contiguous; the module's own and a cohort's stacked ones alternate.
        self._checked: dict[tuple, bool] = {}
        self._segment: tuple | None = None  # (stacked weights, SegmentPlan) while `use_segments` is open
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """LoRA initialisation: every A (and the router) Kaiming-uniform(a=sqrt(5)) independently, every B zero."""
        for a in self.lora_a.reshape(-1, *self.lora_a.shape[-2:]):
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

    def _weights(self) -> tuple[Tensor, ...]:
        # Straight from the registries: six nn.Module.__getattr__ calls cost 3.4 us per forward (d=16, T=1). Names
        # that left them (plain attributes, parametrizations, functional_call) go through getattr.
        params, buffers = self._parameters, self._buffers
        try:
            return (
                params["lora_a"], params["lora_b"], params["router"], params["shared_a"], params["shared_b"],
                buffers["active_experts"],
            )  # fmt: skip
        except KeyError:
            return self.lora_a, self.lora_b, self.router, self.shared_a, self.shared_b, self.active_experts

    def _check_weights(self, weights: tuple) -> bool:
        """Shape/dtype/device checks of a set of weights (the module's own, or a cohort's stacked ones), once per set
        of tensors; returns whether all are contiguous. The op's own per-call validation is skipped after this."""
        key = tuple(map(id, weights))
        contiguous = self._checked.get(key)
        if contiguous is not None:
            return contiguous
        lora_a, lora_b, router, shared_a, shared_b, active = weights
        lead = () if lora_a.dim() == 3 else (lora_a.shape[0],)
        num_slots, rank = self.config.num_experts, self.config.rank
        router_rows = rank if self.config.router == "embedding" else num_slots
        expected = {
            "lora_a": (lora_a, (*lead, num_slots, rank, self.in_features)),
            "lora_b": (lora_b, (*lead, num_slots, self.out_features, rank)),
            "router": (router, (*lead, router_rows, self.in_features)),
            "active_experts": (active, (*lead, num_slots)),
        }
        if self.config.shared_expert:
            expected["shared_a"] = (shared_a, (*lead, rank, self.in_features))
            expected["shared_b"] = (shared_b, (*lead, self.out_features, rank))
        for name, (tensor, shape) in expected.items():
            if not isinstance(tensor, Tensor) or tuple(tensor.shape) != shape:
                got = list(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
                raise ValueError(f"{type(self).__name__}.{name} must have shape {list(shape)}, got {got}")
            if tensor.device != lora_a.device:
                raise ValueError(f"{type(self).__name__}.{name} is on {tensor.device}, lora_a on {lora_a.device}")
        if active.dtype != torch.bool:
            raise TypeError(f"{type(self).__name__}.active_experts must be bool, got {active.dtype}")
        float_dtypes = {t.dtype for t in (lora_a, lora_b, router, shared_a, shared_b) if t is not None}
        if len(float_dtypes) != 1 or not next(iter(float_dtypes)).is_floating_point:
            raise TypeError(
                f"{type(self).__name__} weights must share one floating dtype, got {sorted(map(str, float_dtypes))}"
            )
        if len(self._checked) >= _OFFSETS_CACHE_SIZE:
            self._checked.clear()
        contiguous = self._checked[key] = all(t.is_contiguous() for t in weights if t is not None)
        return contiguous

    def _single_offsets(self, num_tokens: int, device: torch.device) -> Tensor:
        # Cached per (T, device): building [0, T] per call is a host->device copy per module per step on a GPU.
        key = (num_tokens, device)
        offsets = self._offsets.get(key)
        if offsets is None:
            if len(self._offsets) >= _OFFSETS_CACHE_SIZE:
                self._offsets.clear()
            offsets = self._offsets[key] = torch.tensor([0, num_tokens], dtype=torch.int64).to(device)
        return offsets

    def _backend(self, device: torch.device, dtype: torch.dtype) -> str:
        key = (device.type, dtype)
        name = self._backends.get(key)
        if name is None:
            name = self._backends[key] = resolve_backend(self.config.backend, device)
            # The backend's fused autograd op (cpu, cuda), called directly by forward: one dispatcher call per call. It
            # takes `MoLEProblem.flat_args()` (the `fedamole_ext::mole_lora` schema) with int64 offsets.
            self._fused[key] = get_backend(name).fused
        return name

    def forward(self, x: Tensor) -> Tensor:
        """delta [..., d_out] for x [..., d_in] (see the class docstring)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must have last dimension {self.in_features} (in_features), got {tuple(x.shape)}")
        segment = self._segment
        weights = self._weights() if segment is None else segment[0]
        if segment is None and weights[0].dim() == 4:
            raise ValueError(
                f"{type(self).__name__} holds client-stacked weights {list(weights[0].shape)}: call it inside "
                "fedamole.segments.use_segments(...) so that a SegmentPlan says which rows are whose"
            )
        compiling = torch.compiler.is_compiling()
        contiguous = True if compiling else self._check_weights(weights)
        lora_a, lora_b, router, shared_a, shared_b, active = weights
        flat = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        device_type = flat.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else flat.dtype
        if lora_a.dtype != dtype:  # the checked weights share one dtype
            lora_a, lora_b, router = lora_a.to(dtype), lora_b.to(dtype), router.to(dtype)
            if shared_a is not None:
                shared_a, shared_b = shared_a.to(dtype), shared_b.to(dtype)
        expert_input = None
        if self.training and self.config.dropout > 0:
            expert_input = self.dropout(flat)
            if expert_input.dtype != dtype:
                expert_input = expert_input.to(dtype)
        if flat.dtype != dtype:
            flat = flat.to(dtype)
        config = self.config
        fused = None
        if segment is not None:
            offsets = segment[1].token_offsets(flat.shape[0], flat.device)
        elif compiling:
            offsets = None
        else:
            offsets = self._offsets.get((flat.shape[0], flat.device))
            if offsets is None:
                offsets = self._single_offsets(flat.shape[0], flat.device)
        if compiling:
            backend = config.backend
        else:
            backend = self._backends.get((device_type, dtype)) or self._backend(flat.device, dtype)
            if contiguous and flat.is_contiguous():
                fused = self._fused[(device_type, dtype)]
        if fused is not None:
            # Checked, contiguous tensors: the op itself, without mole_lora_prevalidated's generic path (~6 us per call
            # at d=16, T=1).
            delta, probs, topk_idx = fused(
                flat, expert_input, offsets, lora_a, lora_b, router, shared_a, shared_b, active, config.top_k,
                config.scaling, config.router,
            )  # fmt: skip
        else:
            delta, probs, topk_idx = mole_lora_prevalidated(
                flat,
                offsets,
                lora_a,
                lora_b,
                router,
                shared_a,
                shared_b,
                active,
                expert_input,
                top_k=config.top_k,
                scaling=config.scaling,
                router_type=config.router,
                backend=backend,
            )
        if self._routing_recorders:
            for recorder in self._routing_recorders:
                recorder.record(self, probs, topk_idx, active, None if segment is None else offsets)
        elif self._reentrant_cells and torch.is_grad_enabled():
            delta = release_reentrant_term(self, delta, probs, topk_idx, active, None if segment is None else offsets)
        return delta if x.dim() == 2 else delta.view(*x.shape[:-1], self.out_features)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_routing_recorders"], state["_reentrant_cells"], state["_segment"] = (), collections.deque(), None
        # Backend choices depend on the machine (a Ray actor may lack the extension): re-resolved after unpickling.
        state["_backends"], state["_fused"] = {}, {}
        return state

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, experts={c.num_experts}, "
            f"rank={c.rank}, top_k={c.top_k}, router={c.router}, shared_expert={c.shared_expert}"
        )


class MoLELinear(MoLEExperts):
    """Drop-in replacement for an nn.Linear (or GPT-2's Conv1D): ``y = base(x) + MoLEExperts(x)``, base frozen.

    x [..., d_in] -> y [..., d_out] in the base output's dtype. The expert tensors are created in the base weight's
    dtype and device unless `dtype` is given (e.g. fp32 experts on a bf16 backbone). See `MoLEExperts` for the
    parameters and semantics.
    """

    def __init__(self, base: nn.Module, config: MoLEConfig, dtype: torch.dtype | None = None) -> None:
        if not isinstance(config, MoLEConfig):
            raise TypeError(f"config must be a MoLEConfig, got {type(config).__name__}")
        in_features, out_features = base_features(base)
        super().__init__(in_features, out_features, config, device=base.weight.device, dtype=dtype or base.weight.dtype)
        self.base = base
        self.base.requires_grad_(False)
        # The frozen base weights keep the names they had before injection (`q_proj.weight`, not
        # `q_proj.base.weight`): a full state dict of an injected model loads into the plain model (the MoLE keys are
        # reported as unexpected) and a plain model's state dict loads into an injected one, instead of Hugging Face's
        # `from_pretrained` re-initialising every adapted layer's weight as "missing".
        self.register_state_dict_post_hook(_base_keys_to_original_names)
        self.register_load_state_dict_pre_hook(_base_keys_from_original_names)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must have last dimension {self.in_features} (in_features), got {tuple(x.shape)}")
        out = self.base(x)
        delta = super().forward(x)
        return out + (delta if delta.dtype == out.dtype else delta.to(out.dtype))


def _base_keys_to_original_names(module: MoLELinear, state_dict: dict, prefix: str, local_metadata) -> None:
    for name in [k[len(prefix) + 5 :] for k in state_dict if k.startswith(prefix + "base.")]:
        state_dict[prefix + name] = state_dict.pop(prefix + "base." + name)


def _base_keys_from_original_names(module: MoLELinear, state_dict: dict, prefix: str, *args) -> None:
    for name, _ in module.base.named_parameters(recurse=False):
        if prefix + name in state_dict and prefix + "base." + name not in state_dict:
            state_dict[prefix + "base." + name] = state_dict.pop(prefix + name)
    for name, _ in module.base.named_buffers(recurse=False):
        if prefix + name in state_dict and prefix + "base." + name not in state_dict:
            state_dict[prefix + "base." + name] = state_dict.pop(prefix + name)
