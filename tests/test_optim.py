"""StackedAdam over client-stacked tensors equals one torch.optim.Adam per client."""

import pytest
import torch

from fedamole.optim import StackedAdam, clip_grad_norm_per_client


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_stacked_adam_equals_per_client_adam_with_clipping_and_early_exit(weight_decay):
    """weight_decay 0: torch.optim.Adam per client; > 0: torch.optim.AdamW per client (FDLoRA's local optimiser)."""
    torch.manual_seed(0)
    num_clients, steps = 3, 6
    lrs = [1e-2, 5e-3, 2e-2]
    client_steps = [6, 4, 1]  # clients leave the cohort after their own number of steps
    init = [torch.randn(num_clients, 4, 5), torch.randn(num_clients, 7)]
    targets = [torch.randn(num_clients, 4, 5), torch.randn(num_clients, 7)]

    stacked = [t.clone().requires_grad_() for t in init]
    opt = StackedAdam(stacked, num_clients, lr=lrs, eps=1e-6, weight_decay=weight_decay)
    for step in range(steps):
        opt.zero_grad()
        loss = sum(((p - t) ** 3).abs().sum() for p, t in zip(stacked, targets))
        loss.backward()
        clip_grad_norm_per_client(stacked, 1.0, num_clients)
        opt.step(active=torch.tensor([step < n for n in client_steps]))

    for c in range(num_clients):
        params = [t[c].clone().requires_grad_() for t in init]
        ref_cls = torch.optim.AdamW if weight_decay else torch.optim.Adam
        ref = ref_cls(params, lr=lrs[c], eps=1e-6, weight_decay=weight_decay)
        for _ in range(client_steps[c]):
            ref.zero_grad()
            loss = sum(((p - t[c]) ** 3).abs().sum() for p, t in zip(params, targets))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            ref.step()
        for p, s in zip(params, stacked):
            torch.testing.assert_close(s[c].detach(), p.detach(), rtol=1e-6, atol=1e-7)


def test_stacked_adam_validation():
    p = torch.zeros(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="client dimension"):
        StackedAdam([p], 3)
    with pytest.raises(ValueError, match="lr"):
        StackedAdam([p], 2, lr=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="active"):
        StackedAdam([p], 2).step(active=torch.ones(3, dtype=torch.bool))
