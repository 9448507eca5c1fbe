"""fedamole: personalised federated fine-tuning with adaptive mixtures of LoRA experts (FedAMoLE), fast.

import fedamole
model = fedamole.get_mole_model(hf_model, fedamole.MoLEPeftConfig(num_experts=8))   # a peft.PeftModel
out = model(**batch)                          # out.loss includes load_balance_coef * out.aux_loss

model = fedamole.inject_mole(hf_model, fedamole.MoLEConfig(num_experts=8))        # low level, in place
with fedamole.record_routing(model) as routing:
    out = model(**batch)
loss = out.loss + model.fedamole_config.load_balance_coef * routing.load_balance_loss(batch["attention_mask"])
"""

from fedamole.config import MoLEConfig
from fedamole.inject import (
    inject_mole,
    load_mole,
    load_mole_state_dict,
    mole_modules,
    mole_state_dict,
    save_mole,
)
from fedamole.layers import MoLEExperts, MoLELinear
from fedamole.peft_lora import from_peft_lora, to_peft_lora
from fedamole.peft_registration import register_with_peft
from fedamole.routing import RoutingRecorder, load_balance_from_routing, record_routing

# `peft.PeftModel.from_pretrained` reads our adapters after `import fedamole`: FedAMoLE is registered with PEFT now
# if PEFT is imported, else when it gets imported. PEFT itself (~2 s: transformers, torch._dynamo) is imported only
# by what needs it: the PEFT-method names below, on first access.
register_with_peft()
_FROM_PEFT_TUNER = ("MoLEPeftConfig", "MoLEPeftModel", "get_mole_model")


def __getattr__(name: str):
    if name in _FROM_PEFT_TUNER:
        import fedamole.peft_tuner

        return getattr(fedamole.peft_tuner, name)
    raise AttributeError(f"module 'fedamole' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_FROM_PEFT_TUNER))


__all__ = [
    "MoLEConfig",
    "MoLEExperts",
    "MoLELinear",
    "MoLEPeftConfig",
    "MoLEPeftModel",
    "RoutingRecorder",
    "from_peft_lora",
    "get_mole_model",
    "inject_mole",
    "load_balance_from_routing",
    "load_mole",
    "load_mole_state_dict",
    "mole_modules",
    "mole_state_dict",
    "record_routing",
    "save_mole",
    "to_peft_lora",
]
__version__ = "0.1.0"
