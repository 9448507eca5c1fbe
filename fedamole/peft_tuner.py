"""FedAMoLE's mixture of LoRA experts as a PEFT method: ``peft.get_peft_model(model, MoLEPeftConfig(...))``.

    import fedamole
    model = fedamole.get_mole_model(base_model, fedamole.MoLEPeftConfig(num_experts=8, target_modules=["q_proj"]))
    model.print_trainable_parameters()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)   # out.loss includes coef * out.aux_loss
    model.save_pretrained("adapter/")                              # adapter_model.safetensors + adapter_config.json
    model = peft.PeftModel.from_pretrained(base_model, "adapter/")  # after `import fedamole`

Why a registered PEFT method and not a look-alike wrapper: the Hugging Face `Trainer` special-cases `PeftModel`
(adapter-only checkpoints, `resume_from_checkpoint`, best-model reload, the forward signature for column pruning),
and PEFT brings its target matching (suffix, regex, "all-linear", `exclude_modules`), `modules_to_save`,
`disable_adapter()`, `unload()` and multi-adapter bookkeeping. PEFT's method registry accepts only names of its
`PeftType` enum, so importing this module adds the member ``FEDAMOLE`` to that enum (once, checked), then calls
`peft.utils.register_peft_method`; nothing else in PEFT is patched.

Merging is refused: the routed experts' gates depend on each token, so the adapter cannot be folded into W0.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, PeftType, register_peft_method
from torch import Tensor, nn

from fedamole.config import MoLEConfig
from fedamole.layers import MoLEExperts, base_features
from fedamole.routing import close_recorder, open_recorder

PEFT_TYPE_NAME = "FEDAMOLE"
_MOLE_FIELDS = tuple(f.name for f in dataclasses.fields(MoLEConfig) if f.name != "target_modules")


def _peft_type() -> enum.Enum:
    """PeftType.FEDAMOLE, added to PEFT's closed enum on first use (a str-valued member, like PEFT's own)."""
    if PEFT_TYPE_NAME in PeftType.__members__:
        return PeftType[PEFT_TYPE_NAME]
    member = str.__new__(PeftType, PEFT_TYPE_NAME)
    member._name_ = member._value_ = PEFT_TYPE_NAME
    member.__objclass__ = PeftType
    type.__setattr__(PeftType, PEFT_TYPE_NAME, member)
    PeftType._member_map_[PEFT_TYPE_NAME] = member
    PeftType._value2member_map_[PEFT_TYPE_NAME] = member
    PeftType._member_names_.append(PEFT_TYPE_NAME)
    if PeftType(PEFT_TYPE_NAME) is not member or member not in list(PeftType):
        raise RuntimeError("could not register FEDAMOLE in peft.PeftType (unsupported peft/Python version)")
    return member


@dataclass
class MoLEPeftConfig(PeftConfig):
    """PEFT configuration of a FedAMoLE mixture of LoRA experts (the fields of `MoLEConfig`, PEFT's targeting).

    num_experts, rank, alpha, top_k, dropout, router, shared_expert, load_balance_coef, backend: as `MoLEConfig`.
    target_modules: PEFT semantics — a list of names (exact, or a suffix after a dot: "self_attn.q_proj"), a regex
        (full match) or "all-linear" (every linear layer but the output head); None = PEFT's LoRA default for the
        model type (q_proj/v_proj on Llama, query/value on BERT).
    exclude_modules: names or regex never adapted. modules_to_save: extra modules trained and saved (a classifier).
    """

    num_experts: int = field(default=8, metadata={"help": "routed expert slots per adapted layer (E)"})
    rank: int = field(default=8, metadata={"help": "LoRA rank r of every expert"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; experts are scaled by alpha / r"})
    top_k: int = field(default=2, metadata={"help": "routed experts per token"})
    dropout: float = field(default=0.05, metadata={"help": "dropout on the experts' input (routing sees x)"})
    router: str = field(default="embedding", metadata={"help": "'embedding' (FedAMoLE) or 'linear'"})
    shared_expert: bool = field(default=True, metadata={"help": "an always-on LoRA expert with weight 1"})
    load_balance_coef: float = field(default=0.001, metadata={"help": "weight of aux_loss in outputs.loss"})
    backend: str | None = field(default=None, metadata={"help": "mole_lora backend; None = fastest"})
    target_modules: list[str] | str | None = field(default=None, metadata={"help": "modules to adapt"})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "modules never adapted"})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "extra trainable, saved modules"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = _peft_type()
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple, set)):
            self.exclude_modules = set(self.exclude_modules)
        self.to_mole_config()  # validates every MoLE field, errors name the field

    def to_mole_config(self) -> MoLEConfig:
        return MoLEConfig(**{name: getattr(self, name) for name in _MOLE_FIELDS})

    @classmethod
    def from_mole_config(cls, config: MoLEConfig, **peft_fields: Any) -> MoLEPeftConfig:
        """The PEFT config of a `MoLEConfig` (its target names become PEFT suffix targets)."""
        values = {name: getattr(config, name) for name in _MOLE_FIELDS}
        if config.target_modules is not None and "target_modules" not in peft_fields:
            peft_fields["target_modules"] = list(config.target_modules)
        return cls(**values, **peft_fields)


class MoLEPeftLayer(nn.Module, BaseTunerLayer):
    """A frozen base layer plus one `MoLEExperts` per adapter name: ``y = base(x) + sum_active experts[name](x)``."""

    adapter_layer_names = ("mole_experts",)
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: MoLEPeftConfig) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.mole_experts = nn.ModuleDict()
        self.in_features, self.out_features = base_features(base_layer)
        self._active_adapter = adapter_name
        self.merged_adapters = []
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: MoLEPeftConfig, **kwargs: Any) -> None:
        weight = self.get_base_layer().weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        self.mole_experts[adapter_name] = MoLEExperts(
            self.in_features, self.out_features, config.to_mole_config(), device=weight.device, dtype=dtype
        )
        self.set_adapter(self.active_adapters)

    def merge(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "a mixture of LoRA experts cannot be merged into the base weight: its gates depend on each token"
        )

    def unmerge(self) -> None:
        """Nothing is ever merged (see `merge`)."""

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return out
        for name in self.active_adapters:
            if name in self.mole_experts:
                delta = self.mole_experts[name](x)
                out = out + (delta if delta.dtype == out.dtype else delta.to(out.dtype))
        return out

    def __repr__(self) -> str:
        return "mole." + super().__repr__()


class MoLEPeftModel(BaseTuner):
    """The PEFT tuner: injects `MoLEPeftLayer`s and adds ``load_balance_coef * aux_loss`` to ``outputs.loss``.

    Every forward opens a `fedamole.record_routing` on the model; ``outputs.aux_loss`` is the summed SPEC §1
    load-balance loss of the adapted layers (over real tokens when `attention_mask` matches the tokens seen), and
    when the model returned a loss it becomes ``loss + load_balance_coef * aux_loss`` (the Hugging Face MoE
    convention, so the plain `Trainer` trains with it). When the call carries `num_items_in_batch` (the Trainer's
    gradient accumulation), the added term is scaled by this micro-batch's share of those items, so that the
    accumulated loss holds ``load_balance_coef`` times the mean aux loss whatever the accumulation steps and the
    number of DDP ranks (`outputs.aux_loss` itself is not scaled). Nothing is recorded in eval mode without labels
    (`generate`).
    """

    prefix: str = "mole_"
    tuner_layer_cls = MoLEPeftLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _create_and_replace(
        self, peft_config, adapter_name, target, target_name, parent, current_key, **optional_kwargs
    ) -> None:
        if isinstance(target, MoLEPeftLayer):
            target.update_layer(adapter_name, peft_config)
            return
        new_module = MoLEPeftLayer(target, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _check_merge_allowed(self) -> None:
        raise NotImplementedError(
            "a mixture of LoRA experts cannot be merged into the base weights (token-dependent gates); use unload()"
        )

    def __init__(self, model: nn.Module, config, adapter_name: str, **kwargs: Any) -> None:
        super().__init__(model, config, adapter_name, **kwargs)
        # Hooks on the wrapped model, so that every path into it gets the aux loss: PEFT's task models call this
        # tuner, the generic PeftModel calls the wrapped model directly.
        self._open_routing: list = []
        self.model.register_forward_pre_hook(self._open_routing_hook, with_kwargs=True)
        self.model.register_forward_hook(self._aux_loss_hook, with_kwargs=True, always_call=True)

    def forward(self, *args: Any, **kwargs: Any):
        return self.model(*args, **kwargs)

    def _open_routing_hook(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        self._close_routing()  # left open only by a forward that raised before the hook below ran
        if self.training or kwargs.get("labels") is not None:
            self._open_routing.append(open_recorder(self.model))

    def _close_routing(self):
        recorder = None
        while self._open_routing:
            recorder, modules = self._open_routing.pop()
            close_recorder(recorder, modules)
        return recorder

    def _aux_loss_hook(self, model: nn.Module, args: tuple, kwargs: dict, outputs):
        routing = self._close_routing()
        if routing is None or outputs is None:
            return outputs
        mask = kwargs.get("attention_mask")
        first = kwargs.get("input_ids", kwargs.get("inputs_embeds", args[0] if args else None))
        num_tokens = {int(call.probs.shape[0]) for call in routing.calls}
        if (
            not isinstance(mask, Tensor)
            or num_tokens != {mask.numel()}
            or (isinstance(first, Tensor) and tuple(first.shape[:2]) != tuple(mask.shape))
        ):
            mask = None  # a KV-cache step or a mask of another shape: every token the layers saw counts
        aux = routing.load_balance_loss(token_mask=None if mask is None else mask.bool())
        coef = float(self.peft_config[self.active_adapters[0]].load_balance_coef)
        return _attach_aux_loss(outputs, aux, coef, _micro_batch_share(model, kwargs))

    def _unload_and_optionally_merge(self, merge: bool = True, *args: Any, **kwargs: Any):
        if merge:
            self._check_merge_allowed()
        for hooks in (self.model._forward_pre_hooks, self.model._forward_hooks):
            for key in [k for k, hook in hooks.items() if getattr(hook, "__self__", None) is self]:
                del hooks[key]
                self.model._forward_hooks_with_kwargs.pop(key, None)
                self.model._forward_pre_hooks_with_kwargs.pop(key, None)
                self.model._forward_hooks_always_called.pop(key, None)
        return super()._unload_and_optionally_merge(merge, *args, **kwargs)


def _micro_batch_share(model: nn.Module, kwargs: dict) -> Tensor | None:
    """This micro-batch's share of the accumulated batch when the caller passed `num_items_in_batch`, else None.

    With `num_items_in_batch` (the HF `Trainer` passes it under gradient accumulation, summed over every
    micro-batch and, by default, every DDP rank) the model normalises its loss by that total and the Trainer no longer
    divides the micro-batch losses by the number of accumulation steps. An unscaled aux term would then enter the
    accumulated loss once per micro-batch (and per rank): ``coef * aux`` would become ``steps * coef * aux``. Scaled by
    the micro-batch's items over the total, the terms add up to ``coef *`` (item-weighted mean of aux), as without
    accumulation. Items are counted as the Trainer counts them: `shift_labels`, else labels != -100, after dropping
    the first position for causal-LM losses.
    """
    total = kwargs.get("num_items_in_batch")
    labels = kwargs.get("shift_labels")
    if labels is None:
        labels = kwargs.get("labels")
        if isinstance(labels, Tensor) and _loss_shifts_labels(model):
            labels = labels[..., 1:]
    if total is None or not isinstance(labels, Tensor):
        return None
    total = torch.as_tensor(total, device=labels.device, dtype=torch.float32).reshape(-1)[0].clamp(min=1)
    return labels.ne(-100).sum().float() / total


def _loss_shifts_labels(model: nn.Module) -> bool:
    """Whether the model's loss is the causal-LM one (labels shifted by one), decided as the HF Trainer does."""
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
    except ImportError:  # transformers < 4.46: no loss mapping, no num_items_in_batch either
        return False
    is_encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    return LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss and not is_encoder_decoder


def _attach_aux_loss(outputs, aux: Tensor, coef: float, share: Tensor | None = None):
    if isinstance(outputs, tuple):
        return outputs  # return_dict=False: the caller adds coef * aux itself (documented)
    loss = getattr(outputs, "loss", None)
    if loss is not None and coef:
        term = coef * aux.to(loss.device, loss.dtype)
        outputs["loss"] = loss + (term if share is None else term * share.to(loss.device, loss.dtype))
    try:
        outputs["aux_loss"] = aux
    except (TypeError, KeyError):
        pass
    return outputs


def get_mole_model(model: nn.Module, config: MoLEPeftConfig | MoLEConfig, adapter_name: str = "default", **kwargs):
    """``peft.get_peft_model(model, config)`` for a `MoLEPeftConfig` (a `MoLEConfig` is converted)."""
    import peft

    if isinstance(config, MoLEConfig):
        config = MoLEPeftConfig.from_mole_config(config)
    if not isinstance(config, MoLEPeftConfig):
        raise TypeError(f"config must be a MoLEPeftConfig or MoLEConfig, got {type(config).__name__}")
    return peft.get_peft_model(model, config, adapter_name=adapter_name, **kwargs)


_peft_type()
register_peft_method(name=PEFT_TYPE_NAME.lower(), config_cls=MoLEPeftConfig, model_cls=MoLEPeftModel, prefix="mole_")
