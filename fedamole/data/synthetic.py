"""Small synthetic data for the ``tiny`` preset and tests: string tasks that need no download."""

from __future__ import annotations

import numpy as np

from fedamole.data.scenarios import Example

__all__ = ["GEN_TASKS", "synthetic_classification", "synthetic_generation"]

_LETTERS = "abcdefgh"

GEN_TASKS = {
    "copy": lambda s: s,
    "reverse": lambda s: s[::-1],
    "upper": str.upper,
    "sort": lambda s: "".join(sorted(s)),
    "first3": lambda s: s[:3],
    "last3": lambda s: s[-3:],
    "double": lambda s: "".join(ch * 2 for ch in s),
    "dedupe": lambda s: "".join(dict.fromkeys(s)),
    "rot1": lambda s: "".join(_LETTERS[(_LETTERS.index(ch) + 1) % len(_LETTERS)] for ch in s),
    "swap": lambda s: s[1:] + s[:1],
}


def _word(rng: np.random.Generator, lo: int = 4, hi: int = 8) -> str:
    return "".join(rng.choice(list(_LETTERS), size=int(rng.integers(lo, hi + 1))))


def synthetic_classification(n: int = 600, num_labels: int = 3, seed: int = 0) -> tuple[list[Example], list[str]]:
    """ "Which of the first ``num_labels`` letters occurs most?" Prompts are letter strings; answers are letters."""
    if not 2 <= num_labels <= len(_LETTERS):
        raise ValueError(f"num_labels must be in [2, {len(_LETTERS)}], got {num_labels}")
    rng = np.random.default_rng(seed)
    choices = list(_LETTERS[:num_labels])
    out = []
    for i in range(n):
        label = i % num_labels
        letters = list(rng.choice(choices, size=6)) + [choices[label]] * 3
        rng.shuffle(letters)
        text = "".join(letters)
        counts = [text.count(ch) for ch in choices]
        label = int(np.argmax(counts))
        out.append(Example(f"most common letter in {text}? answer: ", choices[label], label, choices[label]))
    return out, choices


def synthetic_generation(n_per_task: int = 40, tasks: list[str] | None = None, seed: int = 0) -> list[Example]:
    """String transformations, one ``group`` per task (use with the one-task-per-client partition)."""
    rng = np.random.default_rng(seed)
    out = []
    for name in tasks or list(GEN_TASKS):
        if name not in GEN_TASKS:
            raise ValueError(f"tasks: unknown task {name!r}; known: {sorted(GEN_TASKS)}")
        for _ in range(n_per_task):
            w = _word(rng)
            out.append(Example(f"{name}: {w} -> ", GEN_TASKS[name](w), -1, name))
    return out
