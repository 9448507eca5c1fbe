"""Prompt templates for causal LMs, as in the authors' setup: Alpaca-style instructions (Dolly, Natural Instructions)
and their SNLI question with the candidate answers Yes / Maybe / No."""

from __future__ import annotations

__all__ = [
    "SNLI_LABELS",
    "SNLI_CHOICES",
    "VITAMINC_CHOICES",
    "format_instruction",
    "format_snli",
    "format_vitaminc",
    "prompt_ids",
]

# SNLI's label ids 0, 1, 2 in order: their names (the partition groups) and the answers the model is scored on.
SNLI_LABELS = ["entailment", "neutral", "contradiction"]
SNLI_CHOICES = ["Yes", "Maybe", "No"]
VITAMINC_CHOICES = ["True", "False", "Neither"]

_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def format_instruction(instruction: str, context: str = "") -> str:
    """The prompt for an instruction with optional input; the response follows it directly."""
    context = (context or "").strip()
    if context:
        return _WITH_INPUT.format(instruction=instruction.strip(), input=context)
    return _NO_INPUT.format(instruction=instruction.strip())


def format_snli(premise: str, hypothesis: str) -> str:
    """The authors' SNLI prompt; the answer (one of `SNLI_CHOICES`, then EOS) follows it directly."""
    return f'Suppose {premise} Can we infer that "{hypothesis}"? Yes, No, or Maybe?\n'


def format_vitaminc(evidence_and_claim: str) -> str:
    """A VitaminC prompt in BIG-bench's layout (its ``example_input_prefix`` and ``example_output_prefix``, without
    the long task prefix): ``evidence_and_claim`` is the task's "Title: evidence\\nClaim: claim" input."""
    return f"Passage: {evidence_and_claim.strip()}\nTrue, False, or Neither? "


def prompt_ids(tokenizer, text: str, add_bos: bool = True) -> list[int]:
    """Token ids of a causal-LM prompt as the model sees it: the tokenizer's BOS first (when ``add_bos`` and the
    tokenizer has one, as the authors' tokenizers add it), then the text without other special tokens."""
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_bos and bos is not None:
        ids = [bos, *ids]
    return ids
