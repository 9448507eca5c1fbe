"""Which modules of a model MoLE adapts: PEFT's `target_modules` / `exclude_modules` semantics, as pure functions.

A target spec is one of
  * a str: a regular expression that must match a module's full dotted name (``re.fullmatch``), e.g.
    ``r".*\\.layers\\.0\\..*(q|v)_proj"``; the special value "all-linear" (any case) selects every nn.Linear and
    transformers ``Conv1D`` except the output head (see `output_head_names`);
  * a tuple of names: a module matches if its full name equals an entry or ends with "." + entry, so "q_proj",
    "self_attn.q_proj" and "model.layers.0.self_attn.q_proj" all work;
  * None (target_modules only): the first of `DEFAULT_TARGETS` whose suffixes match a linear module.
exclude_modules takes the same str / tuple forms (not "all-linear") and is applied after target_modules.
"""

from __future__ import annotations

import re

from torch import nn

ALL_LINEAR = "all-linear"
# PEFT's default LoRA targets, which the reference setup uses: Llama-style first, then BERT-style.
DEFAULT_TARGETS = (("q_proj", "v_proj"), ("query", "value"))
# Classification heads "all-linear" leaves out of models without output embeddings (PEFT's SEQ_CLS_HEAD_NAMES).
CLASSIFIER_HEAD_NAMES = ("score", "classifier")
_REGEX_METACHARACTERS = frozenset(".^$*+?{}[]\\|()")


def normalize_target_spec(value, argument: str, allow_all_linear: bool = True) -> str | tuple[str, ...] | None:
    """`value` as a target spec: None, a regex str, "all-linear" (if `allow_all_linear`) or a tuple of names.

    A str containing a comma and no regex metacharacter is a list written as text ("q_proj, v_proj" ->
    ("q_proj", "v_proj")); any other str is a regex (compiled here to reject bad ones) or "all-linear", which is
    returned lower-case. Lists, tuples and sets become tuples (sets sorted) of stripped names. Raises ValueError
    naming `argument` for anything else.
    """
    if value is None:
        return None
    if isinstance(value, str):
        if "," in value and not _REGEX_METACHARACTERS.intersection(value):
            value = tuple(part for part in value.split(",") if part.strip())
        elif value.strip().lower() == ALL_LINEAR:
            if not allow_all_linear:
                raise ValueError(f"{argument} does not accept {ALL_LINEAR!r}; give a regex or a list of module names")
            return ALL_LINEAR
        elif not value.strip():
            raise ValueError(f"{argument} must not be an empty string")
        else:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"{argument} {value!r} is not a valid regular expression: {exc}") from exc
            return value
    if isinstance(value, (set, frozenset)):
        value = sorted(value, key=str)
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError(
            f"{argument} must be a regex string, {'`all-linear`, ' if allow_all_linear else ''}"
            f"or a non-empty list of non-empty module names, got {value!r}"
        )
    names = tuple(v.strip() for v in value)
    if any(name.lower() == ALL_LINEAR for name in names):
        where = "as the string itself" if allow_all_linear else "to target_modules (a str)"
        raise ValueError(f"{argument}: {ALL_LINEAR!r} inside a list would be a module name; pass it {where}")
    return names


def linear_types() -> tuple[type[nn.Module], ...]:
    """The module types MoLE can adapt: nn.Linear, and transformers' Conv1D (GPT-2 style, weight [in, out])."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers absent: no model can contain a Conv1D
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


def output_head_names(model: nn.Module) -> list[str]:
    """Names of the output head "all-linear" leaves out (the module and everything under it), as PEFT does.

    The head is the module `model.get_output_embeddings()` returns (lm_head of a causal LM); a model without that
    method uses its modules whose last name component is "lm_head". When there is no such head (e.g.
    BertForSequenceClassification), the first of the model's attributes `score` / `classifier` that is a module
    is the head: PEFT leaves it out for task_type="SEQ_CLS", and a classification head is trained whole (pass it
    to `inject_mole(..., extra_trainable=[...])`), never adapted.
    """
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        head = getter()
        heads = [head] if isinstance(head, nn.Module) else []
    else:
        heads = [module for name, module in model.named_modules() if name.rsplit(".", 1)[-1] == "lm_head"]
    if not heads:
        heads = [getattr(model, a) for a in CLASSIFIER_HEAD_NAMES if isinstance(getattr(model, a, None), nn.Module)]
        heads = heads[:1]
    roots = [name for name, module in model.named_modules() if name and any(module is head for head in heads)]
    return [name for name, _ in model.named_modules() if any(name == r or name.startswith(r + ".") for r in roots)]


def matches(spec: str | tuple[str, ...], name: str) -> bool:
    """Whether module `name` matches a normalized spec: regex full match for a str, name suffix for a tuple."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in spec)


def _show(spec) -> str:
    if spec is None:
        return str([list(c) for c in DEFAULT_TARGETS])
    return repr(spec) if isinstance(spec, str) else str(list(spec))


def _linear_summary(model: nn.Module, kinds: tuple[type[nn.Module], ...]) -> str:
    """The linear module names with layer indices folded into "*", e.g. "model.layers.*.self_attn.q_proj"."""
    names = [re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", n) for n, m in model.named_modules() if n and isinstance(m, kinds)]
    unique = list(dict.fromkeys(names))
    if not unique:
        return "none (no nn.Linear or Conv1D at all)"
    return str(unique[:40]) + (f" and {len(unique) - 40} more" if len(unique) > 40 else "")


def resolve_targets(model: nn.Module, target_modules, exclude_modules=None) -> tuple[str | tuple[str, ...], list[str]]:
    """(the target spec used, the full names of the modules to adapt in `named_modules` order); see the module doc.

    With target_modules None the spec used is the chosen `DEFAULT_TARGETS` entry; defaults consider only linear
    modules. Raises ValueError if nothing matches (listing the model's linear modules) or if exclude_modules removes
    every match, and TypeError if a matched, non-excluded module is not an nn.Linear or a transformers Conv1D.
    """
    target_modules = normalize_target_spec(target_modules, "target_modules")
    exclude_modules = normalize_target_spec(exclude_modules, "exclude_modules", allow_all_linear=False)
    kinds = linear_types()
    named = [(name, module) for name, module in model.named_modules() if name]
    if target_modules is None:
        linear = [name for name, module in named if isinstance(module, kinds)]
        spec, matched = DEFAULT_TARGETS[0], []
        for candidate in DEFAULT_TARGETS:
            matched = [name for name in linear if matches(candidate, name)]
            if matched:
                spec = candidate
                break
    elif target_modules == ALL_LINEAR:
        heads = set(output_head_names(model))
        spec = target_modules
        matched = [name for name, module in named if isinstance(module, kinds) and name not in heads]
    else:
        spec = target_modules
        matched = [name for name, _ in named if matches(spec, name)]
    if not matched:
        hint = ""
        if isinstance(target_modules, str) and target_modules != ALL_LINEAR:
            hint = " (a string is a regex matched against the full dotted name; pass a list to match name suffixes)"
        what = "module" if target_modules is not None else "nn.Linear or Conv1D"
        raise ValueError(
            f"target_modules {_show(target_modules)} match no {what} in the model{hint}; its linear "
            f"modules are named: {_linear_summary(model, kinds)}"
        )
    kept = [name for name in matched if exclude_modules is None or not matches(exclude_modules, name)]
    if not kept:
        raise ValueError(
            f"exclude_modules {_show(exclude_modules)} excludes every module target_modules "
            f"{_show(target_modules)} matches ({matched[:8]}{' ...' if len(matched) > 8 else ''}); "
            "nothing would be adapted"
        )
    modules = dict(named)
    wrong = [f"{name!r} ({type(modules[name]).__name__})" for name in kept if not isinstance(modules[name], kinds)]
    if wrong:
        raise TypeError(
            f"target_modules {_show(target_modules)} matches {', '.join(wrong[:5])}"
            f"{' ...' if len(wrong) > 5 else ''}: MoLE adapts only nn.Linear and transformers Conv1D "
            "modules; narrow target_modules or list these in exclude_modules"
        )
    return spec, kept


def resolve_target_names(model: nn.Module, target_modules, exclude_modules=None) -> list[str]:
    """The full dotted names of the modules of `model` to adapt, with PEFT's semantics (see `resolve_targets`)."""
    return resolve_targets(model, target_modules, exclude_modules)[1]
