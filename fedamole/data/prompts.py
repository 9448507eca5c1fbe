"""Prompt templates for causal LMs (Alpaca-style instruction format, as in the reference setup)."""

from __future__ import annotations

__all__ = ["SNLI_LABELS", "format_instruction", "format_snli"]

SNLI_LABELS = ["entailment", "neutral", "contradiction"]

_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
               "Write a response that appropriately completes the request.\n\n"
               "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
             "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def format_instruction(instruction: str, context: str = "") -> str:
    """The prompt for an instruction with optional input; the response follows it directly."""
    context = (context or "").strip()
    if context:
        return _WITH_INPUT.format(instruction=instruction.strip(), input=context)
    return _NO_INPUT.format(instruction=instruction.strip())


def format_snli(premise: str, hypothesis: str) -> str:
    """The SNLI prompt; candidate answers are ``SNLI_LABELS``."""
    instruction = ("Decide whether the premise entails the hypothesis, contradicts it, or neither. "
                   "Answer with one word: entailment, neutral or contradiction.")
    return format_instruction(instruction, f"Premise: {premise.strip()}\nHypothesis: {hypothesis.strip()}")
