"""The paper's presets (``snli``, ``dolly``, ``ni``: a causal LM such as Llama-3.2-1B with the authors' data and
evaluation protocol, SPEC §3) and the paper-like offline ``smol-nli`` / ``smol-ni`` presets on SmolLM2-135M-Instruct.
`fedamole.simulation.presets.PRESETS` holds them next to ``default`` and ``tiny``."""

from __future__ import annotations

__all__ = ["PAPER_PRESETS", "PAPER_PRESET_CONFIGS", "SMOL_NI_TASKS"]

# The authors' evaluation protocol (SPEC §3), shared by the paper presets and the paper-like smol-* presets: no
# gradient clipping, generations decoded with the model's own generation_config and scored by the `rouge` package.
_PAPER_PROTOCOL = {"max_grad_norm": None}
_PAPER_EVAL = {"decoding": "generation_config", "rouge": "rouge"}
_PAPER_MODEL = {
    "type": "hf-causal",
    "path": "meta-llama/Llama-3.2-1B",
    "dtype": "bfloat16",
    "max_length": 1024,
    **_PAPER_EVAL,
}
PAPER_PRESETS = ("snli", "dolly", "ni", "smol-nli", "smol-ni")
SMOL_NI_TASKS = [
    "subtask003_mctaco_question_generation_event_duration",
    "subtask013_mctaco_answer_generation_absolute_timepoint",
    "subtask020_mctaco_span_based_question",
    "subtask022_cosmosqa_passage_inappropriate_binary",
    "subtask033_winogrande_answer_generation",
    "subtask039_qasc_find_overlapping_words",
    "subtask041_qasc_answer_generation",
    "subtask044_essential_terms_identifying_essential_words",
    "subtask050_multirc_answerability",
    "subtask051_multirc_correct_answer_single_sentence",
]

PAPER_PRESET_CONFIGS: dict[str, dict] = {
    # The paper's scenarios: all of SNLI pooled; every instance of the chosen Natural Instructions tasks.
    "snli": {
        **_PAPER_PROTOCOL,
        "model": {**_PAPER_MODEL},
        "data": {"source": "snli", "partition": "dirichlet", "alpha": 0.1, "drop_long": True},
    },
    "dolly": {
        **_PAPER_PROTOCOL,
        "model": {**_PAPER_MODEL},
        "data": {"source": "dolly", "partition": "dirichlet", "alpha": 0.1, "drop_long": True},
    },
    "ni": {
        **_PAPER_PROTOCOL,
        "model": {**_PAPER_MODEL},
        "data": {"source": "ni", "partition": "task", "task_pool": 100, "drop_long": True},
    },
    # Paper-like, offline, on 2 CPU cores: SmolLM2-135M-Instruct (fetched), q_proj/v_proj as for Llama-3.2-1B.
    # Short prompts only (max_length 256, longer ones dropped) and small eval/test caps keep a run near 10 minutes;
    # smol-ni takes 10 of BIG-bench's 61 tasks with short prompts and answers (the paper's rule, the first C of the
    # largest tasks in id order, would give subtask001-010, whose passages are too long for 2 cores).
    "smol-nli": {
        **_PAPER_PROTOCOL,
        "clients": 10,
        "rounds": 6,
        "local_steps": 5,
        "batch_size": 2,
        "lr": 5e-4,
        "threads": 2,
        "model": {"type": "smollm2", "max_length": 256, **_PAPER_EVAL},
        "data": {
            "source": "vitaminc",
            "partition": "dirichlet",
            "alpha": 0.1,
            "max_examples": 6000,
            "embed_cap": 8,
            "eval_cap": 10,
            "test_cap": 10,
            "drop_long": True,
        },
    },
    "smol-ni": {
        **_PAPER_PROTOCOL,
        "clients": 10,
        "rounds": 5,
        "local_steps": 4,
        "batch_size": 2,
        "lr": 5e-4,
        "threads": 2,
        "model": {"type": "smollm2", "max_length": 320, "max_new_tokens": 16, **_PAPER_EVAL},
        "data": {
            "source": "bigbench-ni",
            "partition": "task",
            "task_pool": 100,
            "embed_cap": 6,
            "eval_cap": 6,
            "test_cap": 6,
            "tasks": SMOL_NI_TASKS,
            "drop_long": True,
        },
    },
}
