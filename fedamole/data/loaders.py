"""Loaders for the paper's data sets through the ``datasets`` library, from a local path or the hub.

A local path may be a file (.json, .jsonl, .csv, .parquet), a directory written by ``Dataset.save_to_disk``, or a
directory of such files. Anything else is passed to ``datasets.load_dataset`` as a hub name. Natural Instructions
also accepts its GitHub layout (a directory of ``task*.json`` files with ``Definition`` and ``Instances``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from fedamole.data.prompts import SNLI_LABELS, format_instruction, format_snli
from fedamole.data.scenarios import Example

if TYPE_CHECKING:  # imported lazily: `datasets` is slow to import
    import datasets

__all__ = ["load_table", "load_snli", "load_dolly", "load_natural_instructions", "DOLLY_CATEGORIES"]

_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
DOLLY_CATEGORIES = ["brainstorming", "classification", "closed_qa", "creative_writing", "general_qa",
                    "information_extraction", "open_qa", "summarization"]


def load_table(source: str | Path, split: str = "train") -> datasets.Dataset:
    """A ``datasets.Dataset`` from a local file / directory, or from the hub when ``source`` is not a local path."""
    import datasets

    path = Path(source)
    if path.is_file():
        builder = _BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"source: unsupported file type {path.suffix!r} (use one of {sorted(_BUILDERS)})")
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            ds = datasets.load_from_disk(str(path))
            return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        for suffix, builder in _BUILDERS.items():
            files = sorted(str(p) for p in path.glob(f"*{suffix}"))
            if files:
                return datasets.load_dataset(builder, data_files=files, split="train")
        raise ValueError(f"source: no data files ({', '.join(_BUILDERS)}) in directory {path}")
    return datasets.load_dataset(str(source), split=split)


def _limit(ds: datasets.Dataset, max_examples: int | None, seed: int) -> datasets.Dataset:
    if max_examples is not None and len(ds) > max_examples:
        ds = ds.shuffle(seed=seed).select(range(max_examples))
    return ds


def load_snli(source: str | Path = "stanfordnlp/snli", split: str = "train", max_examples: int | None = None,
              seed: int = 0) -> list[Example]:
    """SNLI as 3-way classification for causal LMs: prompt with premise and hypothesis, target the label word.
    Rows without a gold label (label -1) are dropped. ``group`` is the label word."""
    ds = load_table(source, split)
    ds = _limit(ds.filter(lambda row: row["label"] in (0, 1, 2)), max_examples, seed)
    return [Example(format_snli(r["premise"], r["hypothesis"]), SNLI_LABELS[r["label"]], int(r["label"]),
                    SNLI_LABELS[r["label"]]) for r in ds]


def load_dolly(source: str | Path = "databricks/databricks-dolly-15k", split: str = "train",
               max_examples: int | None = None, seed: int = 0) -> list[Example]:
    """Dolly-15k as instruction following; ``group`` is the category (8 of them), ``label`` its index."""
    ds = _limit(load_table(source, split), max_examples, seed)
    out = []
    for r in ds:
        cat = r.get("category", "")
        label = DOLLY_CATEGORIES.index(cat) if cat in DOLLY_CATEGORIES else -1
        out.append(Example(format_instruction(r["instruction"], r.get("context") or ""), r["response"], label, cat))
    return out


def _ni_rows_from_github(path: Path):
    for f in sorted(path.glob("task*.json")):
        task = json.loads(f.read_text())
        definition = task.get("Definition", "")
        definition = " ".join(definition) if isinstance(definition, list) else definition
        for inst in task.get("Instances", []):
            outputs = inst.get("output", [""])
            yield {"task_name": f.stem, "definition": definition, "inputs": inst.get("input", ""),
                   "targets": outputs[0] if isinstance(outputs, list) and outputs else str(outputs)}


def load_natural_instructions(source: str | Path = "Muennighoff/natural-instructions", split: str = "train",
                              max_per_task: int | None = None, seed: int = 0) -> list[Example]:
    """Natural Instructions (v2.x): one example per instance, ``group`` = task name.

    Tables need columns task_name, definition, inputs, targets (the hub layout); a directory of ``task*.json``
    files (the GitHub layout) is read as well.
    """
    import datasets

    path = Path(source)
    if path.is_dir() and any(path.glob("task*.json")):
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
