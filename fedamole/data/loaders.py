"""Loaders for the paper's data sets through the ``datasets`` library, from a local path or the hub.

A local path may be a file (.json, .jsonl, .csv, .parquet), a directory written by ``Dataset.save_to_disk``, or a
directory of such files. Anything else is passed to ``datasets.load_dataset`` as a hub name. Natural Instructions
also accepts its GitHub layout (``tasks/task*.json`` with ``Definition`` and ``Instances``, and
``splits/default/train_tasks.txt``, or just a directory of ``task*.json`` files). BIG-bench task folders (as
`fedamole.data.fetch` extracts them) are read by `load_bigbench_ni` and `load_vitaminc`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedamole.data.prompts import (
    SNLI_CHOICES,
    SNLI_LABELS,
    VITAMINC_CHOICES,
    format_instruction,
    format_snli,
    format_vitaminc,
)
from fedamole.data.scenarios import Example

if TYPE_CHECKING:  # imported lazily: `datasets` is slow to import
    import datasets

__all__ = [
    "load_table",
    "load_snli",
    "load_dolly",
    "load_natural_instructions",
    "load_bigbench_ni",
    "load_vitaminc",
    "DOLLY_CATEGORIES",
]

_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
DOLLY_CATEGORIES = [
    "brainstorming",
    "classification",
    "closed_qa",
    "creative_writing",
    "general_qa",
    "information_extraction",
    "open_qa",
    "summarization",
]


def load_table(source: str | Path, split: str | None = "train") -> datasets.Dataset:
    """A ``datasets.Dataset`` from a local file / directory, or from the hub when ``source`` is not a local path.
    ``split=None`` pools every split of a hub data set or a saved ``DatasetDict`` (a file is one split)."""
    import datasets

    def pooled(ds):
        if not isinstance(ds, datasets.DatasetDict):
            return ds
        if split is not None:
            return ds[split]
        return datasets.concatenate_datasets([ds[k] for k in ds])

    path = Path(source)
    if path.is_file():
        builder = _BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"source: unsupported file type {path.suffix!r} (use one of {sorted(_BUILDERS)})")
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    if path.is_dir():
        if (
            (path / "dataset_dict.json").exists()
            or (path / "dataset_info.json").exists()
            or (path / "state.json").exists()
        ):
            return pooled(datasets.load_from_disk(str(path)))
        for suffix, builder in _BUILDERS.items():
            files = sorted(str(p) for p in path.glob(f"*{suffix}"))
            if files:
                return datasets.load_dataset(builder, data_files=files, split="train")
        raise ValueError(f"source: no data files ({', '.join(_BUILDERS)}) in directory {path}")
    return pooled(datasets.load_dataset(str(source), split=split))


def _limit(ds: datasets.Dataset, max_examples: int | None, seed: int) -> datasets.Dataset:
    if max_examples is not None and len(ds) > max_examples:
        ds = ds.shuffle(seed=seed).select(range(max_examples))
    return ds


def load_snli(
    source: str | Path = "stanfordnlp/snli", split: str | None = None, max_examples: int | None = None, seed: int = 0
) -> list[Example]:
    """SNLI as the authors set it up: every split pooled (``split=None``), the prompt "Suppose {premise} Can we
    infer that "{hypothesis}"? Yes, No, or Maybe?" and the answer Yes / Maybe / No (`SNLI_CHOICES`). Rows without a
    gold label (label -1) are dropped. ``group`` is the label name (entailment / neutral / contradiction)."""
    ds = load_table(source, split)
    ds = _limit(ds.filter(lambda row: row["label"] in (0, 1, 2)), max_examples, seed)
    return [
        Example(
            format_snli(r["premise"], r["hypothesis"]),
            SNLI_CHOICES[r["label"]],
            int(r["label"]),
            SNLI_LABELS[r["label"]],
        )
        for r in ds
    ]


def load_dolly(
    source: str | Path = "databricks/databricks-dolly-15k",
    split: str = "train",
    max_examples: int | None = None,
    seed: int = 0,
) -> list[Example]:
    """Dolly-15k as instruction following; ``group`` is the category (8 of them), ``label`` its index."""
    ds = _limit(load_table(source, split), max_examples, seed)
    out = []
    for r in ds:
        cat = r.get("category", "")
        label = DOLLY_CATEGORIES.index(cat) if cat in DOLLY_CATEGORIES else -1
        out.append(Example(format_instruction(r["instruction"], r.get("context") or ""), r["response"], label, cat))
    return out


def _first(value) -> str:
    """The first of a list (the authors take the first definition and the first output), or the value itself."""
    if isinstance(value, list):
        return str(value[0]) if value else ""
    return "" if value is None else str(value)


def _ni_rows_from_github(path: Path):
    tasks_dir = path / "tasks" if (path / "tasks").is_dir() else path
    listing = path / "splits" / "default" / "train_tasks.txt"
    if listing.is_file():  # the v2.x repository: the default split's training tasks, in the listed order
        names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        files = [tasks_dir / f"{name}.json" for name in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"source: {listing} lists tasks missing from {tasks_dir}: {missing[:5]}")
    else:
        files = sorted(tasks_dir.glob("task*.json"))
    for f in files:
        task = json.loads(f.read_text())
        definition = _first(task.get("Definition", ""))
        for inst in task.get("Instances", []):
            yield {
                "task_name": f.stem,
                "definition": definition,
                "inputs": inst.get("input", ""),
                "targets": _first(inst.get("output", [""])),
            }


def load_natural_instructions(
    source: str | Path = "Muennighoff/natural-instructions",
    split: str = "train",
    max_per_task: int | None = None,
    seed: int = 0,
) -> list[Example]:
    """Natural Instructions (v2.x): one example per instance (prompt: the task definition as instruction and the
    instance input as context; response: its first output), ``group`` = task name.

    Tables need columns task_name, definition, inputs, targets (the hub layout); the GitHub layout is read as well
    (see the module docstring). ``max_per_task=None`` keeps every instance, as the authors.
    """
    import datasets

    path = Path(source)
    if path.is_dir() and (any(path.glob("task*.json")) or (path / "tasks").is_dir()):
        ds = datasets.Dataset.from_list(list(_ni_rows_from_github(path)))
    else:
        ds = load_table(source, split)
    missing = {"task_name", "definition", "inputs", "targets"} - set(ds.column_names)
    if missing:
        raise ValueError(f"source: Natural Instructions table lacks columns {sorted(missing)}")
    out: list[Example] = []
    per_task: dict[str, int] = {}
    for r in ds.shuffle(seed=seed) if max_per_task else ds:
        t = r["task_name"]
        if max_per_task is not None and per_task.get(t, 0) >= max_per_task:
            continue
        per_task[t] = per_task.get(t, 0) + 1
        out.append(Example(format_instruction(r["definition"], r["inputs"]), r["targets"], -1, t))
    return out


def _bigbench_task(folder: Path) -> dict:
    f = folder / "task.json"
    if not f.is_file():
        raise ValueError(f"source: no BIG-bench task file {f}")
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"source: {f} is not valid JSON ({exc})") from exc


def load_bigbench_ni(root: str | Path, tasks: list[str] | None = None) -> list[Example]:
    """BIG-bench's copy of the original Natural Instructions tasks (``root`` = its ``natural_instructions`` folder,
    one ``subtaskNNN_name/task.json`` per task): prompt = the task's definition (``task_prefix``) as instruction and
    the example input as context, response = the first target; ``group`` = the task folder name. ``tasks`` limits
    the folders read (default: every ``subtask*``)."""
    root = Path(root)
    folders = [root / t for t in tasks] if tasks is not None else sorted(root.glob("subtask*"))
    if not folders:
        raise ValueError(f"source: no subtask* folders under {root}")
    out = []
    for folder in folders:
        task = _bigbench_task(folder)
        definition = str(task.get("task_prefix") or task.get("description", ""))
        for ex in task.get("examples", []):
            out.append(
                Example(
                    format_instruction(definition, str(ex.get("input", ""))),
                    _first(ex.get("target", "")),
                    -1,
                    folder.name,
                )
            )
    return out


def load_vitaminc(root: str | Path, max_examples: int | None = None, seed: int = 0) -> list[Example]:
    """BIG-bench's VitaminC fact verification (``root`` = its ``vitaminc_fact_verification`` folder) as 3-way
    classification: prompt `format_vitaminc`, answer True / False / Neither (`VITAMINC_CHOICES`), ``group`` the
    answer. ``max_examples`` keeps a seeded random subset."""
    task = _bigbench_task(Path(root))
    out = []
    for i, ex in enumerate(task.get("examples", [])):
        scores = ex.get("target_scores", {})
        best = [c for c in VITAMINC_CHOICES if scores.get(c) == 1]
        if len(best) != 1:
            raise ValueError(
                f"source: VitaminC example {i} has no single correct answer among {VITAMINC_CHOICES}: {scores}"
            )
        label = VITAMINC_CHOICES.index(best[0])
        out.append(Example(format_vitaminc(str(ex["input"])), best[0], label, best[0]))
    if max_examples is not None and len(out) > max_examples:
        keep = np.sort(np.random.default_rng(seed).choice(len(out), size=max_examples, replace=False))
        out = [out[i] for i in keep]
    return out
