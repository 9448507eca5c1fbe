"""Federated scenarios, loaders and offline data sets."""

from fedamole.data.loaders import (
    load_bigbench_ni,
    load_dolly,
    load_natural_instructions,
    load_snli,
    load_table,
    load_vitaminc,
)
from fedamole.data.offline import STDLIB_FAMILIES, stdlib_docstrings
from fedamole.data.prompts import (
    SNLI_CHOICES,
    SNLI_LABELS,
    VITAMINC_CHOICES,
    format_instruction,
    format_snli,
    format_vitaminc,
    prompt_ids,
)
from fedamole.data.scenarios import (
    SNLI_SPLIT_SIZES,
    SPLIT_FRACTIONS,
    ClientData,
    Example,
    Scenario,
    build_scenario,
    dirichlet_partition,
    drop_long_prompts,
    snli_split_fractions,
    split_client,
    split_fractions,
    task_id,
    task_partition,
)
from fedamole.data.synthetic import GEN_TASKS, synthetic_classification, synthetic_generation

__all__ = [
    "SNLI_CHOICES", "SNLI_LABELS", "SNLI_SPLIT_SIZES", "SPLIT_FRACTIONS", "STDLIB_FAMILIES", "GEN_TASKS",
    "VITAMINC_CHOICES", "ClientData", "Example", "Scenario", "build_scenario", "dirichlet_partition",
    "drop_long_prompts", "format_instruction", "format_snli", "format_vitaminc", "load_bigbench_ni", "load_dolly",
    "load_natural_instructions", "load_snli", "load_table", "load_vitaminc", "prompt_ids", "snli_split_fractions",
    "split_client", "split_fractions", "stdlib_docstrings", "synthetic_classification", "synthetic_generation",
    "task_id", "task_partition",
]
