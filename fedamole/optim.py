"""Per-client optimisation over client-stacked tensors: one Adam that is exactly S independent Adams.

Adam is element-wise, so one Adam over tensors whose leading dimension is the client equals one Adam per client
— provided each client keeps its own step count and learning rate, gradient clipping is computed per client, and
a client that has finished its local steps is left alone. That is what lets the cohort engine train S clients in
one forward/backward over a shared backbone (SPEC §4).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor


def _per_client(values, num_clients: int, name: str, device) -> Tensor:
    out = torch.as_tensor(values, dtype=torch.float32, device=device).reshape(-1)
    if out.numel() == 1:
        out = out.expand(num_clients)
    if out.numel() != num_clients:
        raise ValueError(f"{name} must be a float or a sequence of {num_clients} (one per client), got {out.numel()}")
    if not bool(torch.isfinite(out).all()) or bool((out < 0).any()):
        raise ValueError(f"{name} must be finite and >= 0, got {out.tolist()}")
    return out.clone()


@torch.no_grad()
def clip_grad_norm_per_client(params: Iterable[Tensor], max_norm: float, num_clients: int) -> Tensor:
    """`torch.nn.utils.clip_grad_norm_` applied to each client's slice (leading dim) of `params` separately.

    Returns the per-client total gradient norms [S] (before clipping). Same formula as PyTorch:
    coef = min(1, max_norm / (norm + 1e-6)).
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(num_clients)
    for g in grads:
        if g.shape[0] != num_clients:
            raise ValueError(
                f"every parameter must have the client dimension first ({num_clients}), got {tuple(g.shape)}"
            )
    squares = torch.stack([g.float().reshape(num_clients, -1).pow(2).sum(1) for g in grads]).sum(0)
    norms = squares.sqrt()
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype).view(-1, *([1] * (g.dim() - 1))))
    return norms


class StackedAdam:
    """Adam (PyTorch's update) over tensors stacked [S, ...] along clients; with ``weight_decay`` > 0 it is AdamW
    (PyTorch's decoupled decay: p *= 1 - lr * weight_decay before the Adam step).

    `lr` may differ per client; `step(active)` updates only the clients in the bool mask `active` [S] (the others
    keep their parameters, moments and step count), so clients with fewer local steps simply leave the cohort.
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        num_clients: int,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        self.params = [p for p in params]
        if not self.params:
            raise ValueError("params must contain at least one tensor")
        if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
            raise ValueError(f"num_clients must be an int >= 1, got {num_clients!r}")
        for p in self.params:
            if p.dim() == 0 or p.shape[0] != num_clients:
                raise ValueError(
                    f"every parameter must have the client dimension first ({num_clients}), got {tuple(p.shape)}"
                )
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be finite and > 0, got {eps}")
        self.num_clients = num_clients
        device = self.params[0].device
        self.lr = _per_client(lr, num_clients, "lr", device)
        if not (math.isfinite(weight_decay) and weight_decay >= 0):
            raise ValueError(f"weight_decay must be finite and >= 0, got {weight_decay}")
        self.betas, self.eps, self.weight_decay = betas, eps, float(weight_decay)
        self.steps = torch.zeros(num_clients, dtype=torch.int64)
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, active: Tensor | None = None) -> None:
        active = torch.ones(self.num_clients, dtype=torch.bool) if active is None else active.cpu().bool()
        if tuple(active.shape) != (self.num_clients,):
            raise ValueError(f"active must be a bool tensor [{self.num_clients}], got {tuple(active.shape)}")
        beta1, beta2 = self.betas
        self.steps += active.long()
        steps = self.steps.clamp(min=1).double()
        # Same arithmetic as torch.optim.Adam (single-tensor path), per client: bias corrections in float64 on host.
        bias1 = 1 - beta1**steps
        bias2_sqrt = (1 - beta2**steps).sqrt()
        step_size = (self.lr.cpu().double() / bias1).float()
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            if p.grad is None:
                continue
            shape = (-1, *([1] * (p.dim() - 1)))
            sel = active.to(p.device).view(shape)
            if self.weight_decay:
                decay = 1 - self.lr.to(p.device, torch.float32).view(shape) * self.weight_decay
                p.mul_(torch.where(sel, decay, torch.ones((), device=p.device)).to(p.dtype))
            g = p.grad
            new_m = m.lerp(g, 1 - beta1)
            new_v = v.mul(beta2).addcmul_(g, g.conj(), value=1 - beta2)
            m.copy_(torch.where(sel, new_m, m))
            v.copy_(torch.where(sel, new_v, v))
            denom = (v.sqrt() / bias2_sqrt.to(p.device, torch.float32).view(shape)).add_(self.eps)
            update = m / denom * step_size.to(p.device).view(shape)
            p.sub_(torch.where(sel, update.to(p.dtype), torch.zeros((), dtype=p.dtype, device=p.device)))
