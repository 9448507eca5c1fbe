"""Prompt-learning baselines on PEFT, as the FedAMoLE authors ran them (SPEC §3):

* FedPrompt: prompt tuning (``peft.PromptTuningConfig``): trainable virtual-token embeddings prepended to the
  input, initialised from the word embeddings of a short task description (the authors' "soft prompt"; one virtual
  token per token of that text, so its length sets their number).
* FedPTuning: p-tuning (``peft.PromptEncoderConfig``, MLP reparameterisation): ``prompt_tokens`` (20) virtual
  tokens produced by a trainable embedding + MLP (hidden size ``ptuning_hidden``, 1024).

Each round every client trains the prompt parameters from the global ones (the backbone stays frozen), and the
server averages them with a plain mean over the clients that uploaded (``aggregation="weighted"``: by training-set
size). FedPrompt / FedPTuning are scored with the averaged prompt, the -FT variants with each client's locally
trained prompt (before aggregation), like FedIT / FedIT-FT. Causal LMs only (the prompts are prepended to a
decoder's input embeddings).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

import fedamole
from fedamole.config import MoLEConfig
from fedamole.fl.baselines import AGGREGATIONS, LoRABaseline

__all__ = [
    "PROMPT_BASELINES",
    "PromptBaseline",
    "prompt_model",
    "prompt_init_text",
    "adapter_state_dict",
    "load_adapter_state_dict",
]

PROMPT_BASELINES = ("fedprompt", "fedprompt-ft", "fedptuning", "fedptuning-ft")

# Prompt-tuning initial texts per scenario (our wording of the authors' idea: describe the task in one sentence).
_INIT_TEXTS = {
    "snli": "Decide whether the hypothesis follows from the premise, and answer Yes, No or Maybe.",
    "dolly": "Write a clear and direct response that completes the instruction using any context given.",
    "natural-instructions": "Write a clear and direct response that completes the instruction using any context given.",
}
_GENERIC_TEXT = "Read the request below and answer it accurately."


def prompt_init_text(scenario_name: str, override: str | None = None) -> str:
    """The text whose word embeddings initialise FedPrompt's virtual tokens."""
    if override is not None:
        if not isinstance(override, str) or not override.strip():
            raise ValueError(f"baselines.prompt_init_text must be a non-empty string or null, got {override!r}")
        return override
    return _INIT_TEXTS.get(scenario_name, _GENERIC_TEXT)


def prompt_model(model: nn.Module, tokenizer, algorithm: str, settings: dict, scenario_name: str) -> nn.Module:
    """``model`` (a causal LM) wrapped by PEFT for ``algorithm``'s prompt learning; only the prompt trains."""
    from peft import (
        PromptEncoderConfig,
        PromptEncoderReparameterizationType,
        PromptTuningConfig,
        PromptTuningInit,
        TaskType,
        get_peft_model,
    )

    if algorithm not in PROMPT_BASELINES:
        raise ValueError(f"algorithm must be one of {PROMPT_BASELINES}, got {algorithm!r}")
    if algorithm.startswith("fedprompt"):
        text = prompt_init_text(scenario_name, settings.get("prompt_init_text"))
        ids = list(tokenizer.encode(text, add_special_tokens=False))
        if not ids:
            raise ValueError(f"baselines.prompt_init_text {text!r} encodes to no tokens")
        config = PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=len(ids), prompt_tuning_init=PromptTuningInit.RANDOM
        )
        wrapped = get_peft_model(model, config)
        # PEFT's TEXT initialisation, done here so that any tokenizer works (PEFT would reload one by name).
        with torch.no_grad():
            words = model.get_input_embeddings()(torch.tensor(ids, device=model.device))
            wrapped.prompt_encoder["default"].embedding.weight.copy_(words)
    else:
        config = PromptEncoderConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=int(settings["prompt_tokens"]),
            encoder_reparameterization_type=PromptEncoderReparameterizationType.MLP,
            encoder_hidden_size=int(settings["ptuning_hidden"]),
        )
        wrapped = get_peft_model(model, config)
    return wrapped


def _prompt_parameters(model: nn.Module) -> dict[str, Tensor]:
    return {k: p for k, p in model.named_parameters() if p.requires_grad and k.startswith("prompt_encoder.")}


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The trainable state of a simulation's model: `fedamole.mole_state_dict` for a MoLE model, the prompt
    encoder's parameters for a PEFT prompt-learning model (detached references)."""
    if fedamole.mole_modules(model):
        return fedamole.mole_state_dict(model)
    params = _prompt_parameters(model)
    if not params:
        raise ValueError("model has neither MoLE modules nor a trainable PEFT prompt encoder")
    return {k: p.detach() for k, p in params.items()}


@torch.no_grad()
def load_adapter_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Inverse of `adapter_state_dict` (all keys and shapes checked before anything is written)."""
    if fedamole.mole_modules(model):
        fedamole.load_mole_state_dict(model, state)
        return
    params = _prompt_parameters(model)
    if set(params) != set(state):
        raise ValueError(f"state does not match the model's prompt encoder: {sorted(set(params) ^ set(state))[:4]}")
    for k, p in params.items():
        if tuple(state[k].shape) != tuple(p.shape):
            raise ValueError(f"state[{k!r}] has shape {list(state[k].shape)}, expected {list(p.shape)}")
    for k, p in params.items():
        p.copy_(state[k])


class PromptBaseline(LoRABaseline):
    """One of `PROMPT_BASELINES`: FedAvg (FedIT's schedule) over the prompt encoder's parameters."""

    def __init__(self, name: str, aggregation: str = "mean") -> None:
        if name not in PROMPT_BASELINES:
            raise ValueError(f"name must be one of {PROMPT_BASELINES}, got {name!r}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        self.name, self.aggregation = name, aggregation
        self.evaluates_global = not name.endswith("-ft")

    def mole_config(self, base: MoLEConfig) -> MoLEConfig:
        # The model carries no MoLE layer (see `prompt_model`); nothing adds a load-balance loss.
        return dataclasses.replace(base, load_balance_coef=0.0)

    def initial_state(self, model, seed: int) -> dict:
        """The prompt encoder's initial parameters (identical for every client), float32 CPU copies."""
        params = _prompt_parameters(model)
        if not params:
            raise ValueError(f"{self.name} needs a PEFT prompt-learning model (model.type tiny-llama or hf-causal)")
        return {k: p.detach().float().cpu().clone() for k, p in params.items()}
