"""Property test (issue 13): the registered ops, called directly with arbitrary seg_offsets and top-k ids, never crash
the process. Every call either returns the reference's result (valid input) or raises a Python exception (invalid
input). The hypothesis loop runs in a child process whose exit code must be 0: an out-of-bounds access there is a
signal or an abort, not an exception.

Ops: torch.ops.fedamole.mole_lora_fwd/_bwd (reference, cpu, triton), torch.ops.fedamole_ext.mole_lora_fwd/_bwd,
the fused fedamole_ext::mole_lora (its backward with tampered ids), and the Triton launchers under
TRITON_INTERPRET=1, with tiny shapes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
HUGE = [10**9, -(10**9), 2**33 + 1, -(2**40), 2**62]


def _offsets_ok(offsets: list[int], num_tokens: int) -> bool:
    return offsets[0] == 0 and offsets[-1] == num_tokens and all(a <= b for a, b in zip(offsets, offsets[1:]))


def _ids_ok(ids: list[list[int]], mask: list[list[bool]], offsets: list[int]) -> bool:
    for s in range(len(offsets) - 1):
        for t in range(offsets[s], offsets[s + 1]):
            real = [i for i in ids[t] if i != -1]
            if len(set(real)) != len(real) or any(not (0 <= i < len(mask[s]) and mask[s][i]) for i in real):
                return False
    return True


def _fuzz_main(group: str, examples: int) -> None:
    """The child: `group` "cpu" (reference, C++ ops) or "triton" (launchers and the custom op, interpreted)."""
    import torch
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    import fedamole_kernels  # noqa: F401  (registers torch.ops.fedamole.* and loads the extension's ops)

    @st.composite
    def cases(draw):
        num_tokens, num_segments = draw(st.integers(0, 6)), draw(st.integers(1, 3))
        num_slots, rank = draw(st.integers(1, 4)), draw(st.integers(1, 3))
        cuts = sorted(draw(st.lists(st.integers(0, num_tokens), min_size=num_segments - 1, max_size=num_segments - 1)))
        any_int = st.one_of(st.integers(-3, num_tokens + 3), st.sampled_from(HUGE))
        offsets = draw(
            st.one_of(
                st.just([0, *cuts, num_tokens]), st.lists(any_int, min_size=num_segments + 1, max_size=num_segments + 1)
            )
        )
        mask = draw(
            st.lists(
                st.lists(st.booleans(), min_size=num_slots, max_size=num_slots),
                min_size=num_segments,
                max_size=num_segments,
            )
        )
        top_k = draw(st.integers(1, num_slots + 1))
        any_id = st.one_of(st.integers(-3, num_slots + 2), st.sampled_from(HUGE))
        ids = draw(
            st.one_of(
                st.none(),
                st.lists(st.lists(any_id, min_size=top_k, max_size=top_k), min_size=num_tokens, max_size=num_tokens),
            )
        )
        return dict(
            num_tokens=num_tokens,
            num_segments=num_segments,
            num_slots=num_slots,
            rank=rank,
            d_in=draw(st.integers(1, 4)),
            d_out=draw(st.integers(1, 3)),
            offsets=offsets,
            mask=mask,
            top_k=top_k,
            ids=ids,
            router_type=draw(st.sampled_from(["embedding", "linear"])),
            shared=draw(st.booleans()),
            expert_input=draw(st.booleans()),
            grad_probs=draw(st.booleans()),
            split=draw(st.sampled_from(["0", "16"])),
            seed=draw(st.integers(0, 2**16)),
        )

    def tensors(c):
        g = torch.Generator().manual_seed(c["seed"])
        t, s, e, r, d, o = (c[k] for k in ("num_tokens", "num_segments", "num_slots", "rank", "d_in", "d_out"))
        rows = r if c["router_type"] == "embedding" else e
        return (
            torch.randn(t, d, generator=g),
            torch.randn(t, d, generator=g) if c["expert_input"] else None,
            torch.tensor(c["offsets"], dtype=torch.int64),
            torch.randn(s, e, r, d, generator=g),
            torch.randn(s, e, o, r, generator=g),
            torch.randn(s, rows, d, generator=g),
            torch.randn(s, r, d, generator=g) if c["shared"] else None,
            torch.randn(s, o, r, generator=g) if c["shared"] else None,
            torch.tensor(c["mask"]),
        )

    def attempt(fn):
        try:
            return fn()
        except Exception as exc:  # every failure must be a Python exception; a crash ends the child
            return exc

    def close(got, want):
        for a, b in zip(got, want):
            if isinstance(b, torch.Tensor) and b.numel():
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, equal_nan=True)

    fwd_ops = {"reference": lambda a, k: torch.ops.fedamole.mole_lora_fwd(*a, *k, "reference")}
    bwd_ops = {"reference": lambda a, k: torch.ops.fedamole.mole_lora_bwd(*a, *k, "reference")}
    if group == "cpu":
        fwd_ops.update(
            op_cpu=lambda a, k: torch.ops.fedamole.mole_lora_fwd(*a, *k, "cpu"),
            ext=lambda a, k: torch.ops.fedamole_ext.mole_lora_fwd(*a, *k),
            fused=lambda a, k: torch.ops.fedamole_ext.mole_lora(*a, *k),
        )
        bwd_ops.update(
            op_cpu=lambda a, k: torch.ops.fedamole.mole_lora_bwd(*a, *k, "cpu"),
            ext=lambda a, k: torch.ops.fedamole_ext.mole_lora_bwd(*a, *k),
        )
    else:
        from fedamole_kernels import triton_mole_lora

        fwd_ops.update(
            launcher=lambda a, k: triton_mole_lora.mole_lora_forward(*a, *k),
            op_triton=lambda a, k: torch.ops.fedamole.mole_lora_fwd(*a, *k, "triton"),
        )
        bwd_ops.update(launcher=lambda a, k: triton_mole_lora.mole_lora_backward(*a, *k))

    @settings(
        max_examples=examples, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )
    @given(cases())
    def check(c):
        os.environ["FEDAMOLE_CPU_SPLIT_MAX_TOKENS"] = c["split"]
        x, xe, offs, a, b, w, sa, sb, mask = args = tensors(c)
        consts = (c["top_k"], 1.5, c["router_type"])
        valid = _offsets_ok(c["offsets"], c["num_tokens"])
        want = attempt(lambda: fwd_ops["reference"](args, consts))
        for name, op in fwd_ops.items():
            got = attempt(lambda op=op: op(args, consts))
            if not valid:
                assert isinstance(got, Exception), f"{name} forward accepted seg_offsets {c['offsets']}"
            else:
                assert not isinstance(got, Exception), f"{name} forward raised on valid input: {got!r}"
                close(got, want)
        probs = want[1] if valid else torch.rand(c["num_tokens"], c["num_slots"])
        if c["ids"] is not None:
            ids = torch.tensor(c["ids"], dtype=torch.int64).reshape(c["num_tokens"], c["top_k"])
        else:
            ids = want[2] if valid else torch.full((c["num_tokens"], c["top_k"]), -1)
        ids_valid = valid and _ids_ok(ids.tolist(), c["mask"], c["offsets"])
        grad = torch.randn(c["num_tokens"], c["d_out"])
        grad_probs = torch.randn(c["num_tokens"], c["num_slots"]) if c["grad_probs"] else None
        bargs = (grad, grad_probs, *args, probs, ids)
        want = attempt(lambda: bwd_ops["reference"](bargs, consts))
        for name, op in bwd_ops.items():
            got = attempt(lambda op=op: op(bargs, consts))
            if not ids_valid:
                assert isinstance(got, Exception), f"{name} backward accepted offsets {c['offsets']} / ids {ids}"
            else:
                assert not isinstance(got, Exception), f"{name} backward raised on valid input: {got!r}"
                if c["ids"] is None:  # the forward's own choice: every backend must agree with the reference
                    close(got, want)
        if group == "cpu" and valid and c["num_tokens"]:
            leaves = [t.clone().requires_grad_() for t in (x, a, b, w)]
            out = attempt(
                lambda: torch.ops.fedamole_ext.mole_lora(leaves[0], xe, offs, *leaves[1:], sa, sb, mask, *consts)
            )
            assert not isinstance(out, Exception), repr(out)
            out[2].data.copy_(ids)  # tampered saved ids (untracked): the C++ autograd node runs mole_lora_bwd on them
            back = attempt(lambda: out[0].sum().backward())
            assert isinstance(back, Exception) != ids_valid, f"fused backward with ids {ids}: {back!r}"

    check()
    print("fuzz ok")


def _run_child(group: str, examples: int, env: dict) -> None:
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]), **env}
    code = f"import test_hardening_kernels_fuzz as m; m._fuzz_main({group!r}, {examples})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=600)
    assert proc.returncode == 0, f"child exited with {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "fuzz ok" in proc.stdout


def test_cpu_and_reference_ops_never_crash_on_arbitrary_offsets_and_ids():
    from fedamole_kernels import HAS_CPU_EXT

    if not HAS_CPU_EXT:
        pytest.skip("C++ extension not built")
    _run_child("cpu", 150, {})


def test_triton_launchers_never_crash_on_arbitrary_offsets_and_ids():
    pytest.importorskip("triton")
    _run_child("triton", 10, {"TRITON_INTERPRET": "1"})
