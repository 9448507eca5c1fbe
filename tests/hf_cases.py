"""Shared pieces of the Hugging Face training-stack tests (test_hf_training.py, test_hf_runtime.py): a tiny
PEFT-wrapped Llama with MoLE, deterministic non-zero experts and a padded causal-LM batch."""

import torch
from test_models import tiny_llama

import fedamole
from fedamole import MoLEPeftConfig

VOCAB = 97


def llama_mole_config(**overrides) -> MoLEPeftConfig:
    fields = {"num_experts": 4, "rank": 4, "dropout": 0.0, "task_type": "CAUSAL_LM", **overrides}
    return MoLEPeftConfig(**fields)


def peft_llama(seed=0, **overrides):
    return fedamole.get_mole_model(tiny_llama(seed), llama_mole_config(**overrides))


def randomise_b(model, std=0.3, seed=1):
    """Non-zero expert outputs (B starts at zero), deterministically."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("lora_b", "shared_b")):
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def mole_params(model):
    return {
        n: p for n, p in model.named_parameters() if n.endswith(("lora_a", "lora_b", "router", "shared_a", "shared_b"))
    }


def lm_batch(rows=2, length=9, seed=3, pad=3):
    """input_ids / attention_mask / labels with the last `pad` positions of the last row padded (labels -100)."""
    ids = torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[-1, length - pad :] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
