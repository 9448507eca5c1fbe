"""Federated scenarios, loaders and offline data sets."""

from fedamole.data.loaders import load_dolly, load_natural_instructions, load_snli, load_table
from fedamole.data.offline import STDLIB_FAMILIES, stdlib_docstrings
from fedamole.data.prompts import SNLI_LABELS, format_instruction, format_snli
from fedamole.data.scenarios import (
    SPLIT_FRACTIONS,
    ClientData,
    Example,
    Scenario,
    build_scenario,
    dirichlet_partition,
    split_client,
    task_partition,
)
from fedamole.data.synthetic import GEN_TASKS, synthetic_classification, synthetic_generation

__all__ = [
    "SNLI_LABELS", "SPLIT_FRACTIONS", "STDLIB_FAMILIES", "GEN_TASKS", "ClientData", "Example", "Scenario",
    "build_scenario", "dirichlet_partition", "format_instruction", "format_snli", "load_dolly",
    "load_natural_instructions", "load_snli", "load_table", "split_client", "stdlib_docstrings",
    "synthetic_classification", "synthetic_generation", "task_partition",
]
