"""`FastDropout`: an `nn.Dropout` whose CPU mask is 7.7x cheaper (`fedamole_kernels.dropout`), and a helper that
puts it in place of a model's dropout modules.

    n = use_fast_dropout(model)      # every nn.Dropout of the model (same p), in place; returns how many

MoLE layers use it for their expert-input dropout. The simulation puts it into the backbone too: BERT's hidden and
embedding dropout (13 of MiniLM's 31 draws per training step) and, through the attention implementation
``fedamole_sdpa`` (transformers' sdpa, except for training with dropout on CPU), the attention probabilities' (6
more). Masks differ from `nn.Dropout`'s draws (same distribution, drop
probability realised to 2**-16), so runs are reproducible under `torch.manual_seed` but not bitwise equal to runs
with `nn.Dropout`.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

from fedamole_kernels.dropout import dropout as dropout_fn

__all__ = ["FastDropout", "use_fast_dropout"]


class FastDropout(nn.Dropout):
    """`nn.Dropout` (same ``p``, ``inplace`` and semantics) with `fedamole_kernels.dropout.dropout`'s mask."""

    def forward(self, x: Tensor) -> Tensor:
        if self.inplace and self.training and self.p > 0:
            return x.copy_(dropout_fn(x, self.p, True))
        return dropout_fn(x, self.p, self.training)

    def __setstate__(self, state: dict) -> None:
        # A model unpickled in a fresh process (a Ray actor) may attend with fedamole_sdpa: register it there too.
        super().__setstate__(state)
        if "transformers" in sys.modules:
            _register_attention()


def use_fast_dropout(model: nn.Module) -> int:
    """Replace every module of exactly type `nn.Dropout` in ``model`` by a `FastDropout` with the same settings, and
    switch each Hugging Face model inside it that attends with ``sdpa`` to ``fedamole_sdpa`` (the same attention,
    its training-time probability dropout drawn the same way); returns the number of dropout modules replaced
    (subclasses, which may do more, are left alone)."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                fast = FastDropout(child.p, child.inplace)
                fast.train(child.training)
                setattr(parent, name, fast)
                count += 1
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "_attn_implementation", None) == "sdpa" and hasattr(module, "set_attn_implementation"):
            _register_attention()
            module.set_attn_implementation(ATTENTION_NAME)
    return count


ATTENTION_NAME = "fedamole_sdpa"  # transformers attention implementation: sdpa, with FastDropout's draw in training


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' sdpa attention, except in training with dropout on CPU: softmax(q k^T * scale + mask) V with
    the probabilities dropped by `fedamole_kernels.dropout.dropout` (sdpa's math path, which training with dropout
    takes on CPU anyway, spends 8.0 ms per MiniLM layer and step in `bernoulli_` for its [46, 12, 48, 48] mask where
    this draw takes 1.0 ms: `benchmarks/bench_dropout.py`)."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    plain = dropout == 0.0 or not module.training or query.device.type != "cpu"
    if plain or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    lowest = torch.finfo(scores.dtype).min
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, lowest)
        else:
            scores = scores + attention_mask[..., : key.shape[-2]]
    elif (is_causal if is_causal is not None else getattr(module, "is_causal", True)) and query.shape[2] > 1:
        q_len, k_len = query.shape[2], key.shape[2]
        future = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).triu(k_len - q_len + 1)
        scores = scores.masked_fill(future, lowest)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(dropout_fn(probs, dropout, True), value)
    return out.transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if ATTENTION_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, _attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)
