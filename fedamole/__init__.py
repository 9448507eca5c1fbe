"""fedamole: personalised federated fine-tuning with adaptive mixtures of LoRA experts (FedAMoLE), fast.

    import fedamole
    model = fedamole.inject_mole(model, fedamole.MoLEConfig(num_experts=8))
    loss = task_loss + model_config.load_balance_coef * fedamole.load_balance_loss(model)
"""

from fedamole.config import MoLEConfig
from fedamole.inject import (
    inject_mole,
    load_balance_loss,
    load_mole,
    load_mole_state_dict,
    mole_modules,
    mole_state_dict,
    save_mole,
)
from fedamole.layers import MoLELinear, load_balance_from_routing
from fedamole.peft_lora import from_peft_lora, to_peft_lora

__all__ = [
    "MoLEConfig",
    "MoLELinear",
    "from_peft_lora",
    "inject_mole",
    "load_balance_from_routing",
    "load_balance_loss",
    "load_mole",
    "load_mole_state_dict",
    "mole_modules",
    "mole_state_dict",
    "save_mole",
    "to_peft_lora",
]
__version__ = "0.1.0"
