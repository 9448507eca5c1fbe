"""`fedamole_kernels.dropout` and `fedamole.dropout.FastDropout`: the mask's distribution, scaling, gradient,
reproducibility, the fallbacks to torch's dropout, and the module swap."""

import math

import pytest
import torch
from tiny_models import tiny_bert, tiny_llama
from torch import nn

from fedamole.dropout import FastDropout, use_fast_dropout
from fedamole_kernels.dropout import MIN_ELEMENTS, dropout, keep_mask, quantized_drop_probability


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_mask_keeps_each_element_with_probability_one_minus_p(p):
    torch.manual_seed(0)
    n = 200_000
    keep = keep_mask([n], p)
    assert keep.dtype == torch.bool and keep.shape == (n,)
    q = quantized_drop_probability(p)
    assert abs(q - p) <= 2**-17
    sigma = math.sqrt(q * (1 - q) / n)
    assert abs(float((~keep).float().mean()) - q) < 5 * sigma
    # neighbouring elements (which share a 64-bit draw) are independent: P(both dropped) = q^2
    pairs = (~keep[0::2] & ~keep[1::2]).float().mean()
    assert abs(float(pairs) - q * q) < 5 * math.sqrt(q * q * (1 - q * q) / (n // 2))


def test_masks_follow_torch_manual_seed_and_differ_between_calls():
    torch.manual_seed(3)
    a, b = keep_mask([64, 64], 0.3), keep_mask([64, 64], 0.3)
    torch.manual_seed(3)
    assert torch.equal(keep_mask([64, 64], 0.3), a)
    assert not torch.equal(a, b)
    gen = torch.Generator().manual_seed(3)
    assert torch.equal(keep_mask([64, 64], 0.3, generator=gen), a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dropout_scales_kept_elements_and_its_gradient_is_the_mask(dtype):
    x = torch.randn(96, 80, dtype=dtype).requires_grad_()
    assert x.numel() >= MIN_ELEMENTS
    p = 0.2
    torch.manual_seed(1)
    out = dropout(x, p)
    torch.manual_seed(1)
    keep = keep_mask(x.shape, p)
    scale = 1 / (1 - quantized_drop_probability(p))
    torch.testing.assert_close(out, (x * keep * scale).detach())
    grad = torch.randn_like(x)
    out.backward(grad)
    torch.testing.assert_close(x.grad, grad * keep * scale)
    mean = dropout(torch.ones(400, 400), p).mean()
    assert abs(float(mean) - 1) < 0.01  # the expectation is x


def test_identity_zero_and_fallbacks():
    x = torch.randn(100, 100)
    assert dropout(x, 0.0) is x and dropout(x, 0.5, training=False) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    small = torch.randn(4, 4)
    torch.manual_seed(0)
    expected = torch.nn.functional.dropout(small, 0.5, True)
    torch.manual_seed(0)
    torch.testing.assert_close(dropout(small, 0.5), expected)  # small tensors: torch's own draw
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="p must be"):
            dropout(x, bad)
        with pytest.raises(ValueError, match="p must be"):
            keep_mask([3], bad)


def test_compiled_dropout_runs():
    fn = torch.compile(lambda t: dropout(t, 0.5), backend="eager", fullgraph=True)
    out = fn(torch.ones(128, 128))
    assert set(out.unique().tolist()) <= {0.0, 2.0}


def test_op_registration():
    torch.library.opcheck(torch.ops.fedamole.dropout_keep_mask.default, ([8, 9], 0.25, 7))


def test_fast_dropout_module_and_swap():
    x = torch.randn(64, 128)
    module = FastDropout(0.3)
    torch.manual_seed(5)
    out = module(x)
    torch.manual_seed(5)
    torch.testing.assert_close(out, dropout(x, 0.3))
    module.eval()
    assert module(x) is x
    inplace = FastDropout(0.3, inplace=True)
    y = x.clone()
    torch.manual_seed(5)
    assert inplace(y) is y
    torch.testing.assert_close(y, out)

    class Custom(nn.Dropout):
        pass

    model = tiny_bert()
    before = sum(type(m) is nn.Dropout for m in model.modules())
    model.bert.extra = Custom(0.1)
    assert before > 0 and use_fast_dropout(model) == before
    assert not any(type(m) is nn.Dropout for m in model.modules()) and type(model.bert.extra) is Custom
    torch.manual_seed(0)
    ids = torch.randint(0, 97, (2, 9))
    model.train()
    assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.parametrize("make", [tiny_bert, tiny_llama])
@pytest.mark.parametrize("padded", [False, True])
def test_fedamole_sdpa_math_path_equals_sdpa(make, padded):
    """The training path of ``fedamole_sdpa`` (its own softmax attention) gives sdpa's outputs and gradients when no
    probability is dropped (a drop probability that rounds to 0), with padding masks, causal masks and GQA."""
    import copy

    from fedamole.dropout import ATTENTION_NAME

    reference = make().train()
    for m in reference.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    fast = copy.deepcopy(reference)
    use_fast_dropout(fast)
    assert fast.config._attn_implementation == ATTENTION_NAME
    for name, m in fast.named_modules():  # attention dropout on (so the math path runs) but below 2**-17: keeps all
        if isinstance(m, nn.Dropout) and "attention" in name or hasattr(m, "attention_dropout"):
            if hasattr(m, "attention_dropout"):
                m.attention_dropout = 2.0**-20
            else:
                m.p = 2.0**-20
    ids = torch.randint(3, 97, (3, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 11, dtype=torch.long)
    if padded:
        mask[1, 7:] = 0
    outs = []
    for model in (reference, fast):
        logits = model(input_ids=ids, attention_mask=mask).logits
        logits.pow(2).sum().backward()
        outs.append((logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(outs[0][1], outs[1][1], strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_fedamole_sdpa_drops_attention_probabilities():
    from fedamole.dropout import _attention

    module = nn.Module().train()
    q, k, v = (torch.randn(2, 3, 40, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    torch.manual_seed(4)
    out, _ = _attention(module, q, k, v, None, dropout=0.25, scaling=0.25, is_causal=False)
    torch.manual_seed(4)
    probs = torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1)
    expected = (dropout(probs, 0.25) @ v).transpose(1, 2)
    torch.testing.assert_close(out, expected)


def test_a_pickled_model_attends_in_a_fresh_process(tmp_path):
    """A Ray actor unpickles models in a process where nothing registered ``fedamole_sdpa`` yet."""
    import subprocess
    import sys

    model = tiny_bert()
    use_fast_dropout(model)
    torch.save(model, tmp_path / "model.pt")
    code = (
        "import torch; m = torch.load(r'%s', weights_only=False).train(); "
        "print(m(input_ids=torch.randint(3, 97, (2, 40))).logits.shape)" % (tmp_path / "model.pt")
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "torch.Size([2, 3])" in out.stdout
