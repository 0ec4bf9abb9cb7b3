"""The pre-fusion attention backward (two Triton kernels) against an fp64 reference: every gradient's
error at most 2x the same-dtype PyTorch path's error (plus a small atol), NaN-poisoned buffers."""

import itertools

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from llava_mini.kernels.prefusion import backward as kernel_backward
from llava_mini.kernels.prefusion import prefusion_attention, prefusion_attention_ref
from llava_mini.kernels.prefusion.ref import causal_mask


@pytest.fixture(autouse=True)
def nan_poisoned_gradients(monkeypatch):
    """Gradient buffers start as NaN: any element the kernels fail to write shows."""
    monkeypatch.setattr(kernel_backward, "new_gradient", lambda like: torch.full_like(like, float("nan")))


def _inputs(shapes, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen).to(device, dtype) for shape in shapes]


def _gradients(fn, q, k, v, grad):
    """(out, dq, dk, dv) of ``fn`` at q, k, v with incoming gradient ``grad``."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def _assert_gradients_within_twice_torch_error(q, k, v, grad, atol=1e-5, **kwargs):
    """Each of out, dq, dk, dv: |kernel - fp64| <= 2 |same-dtype reference - fp64| + atol."""
    kernel = _gradients(lambda *t: prefusion_attention(*t, backend="triton", **kwargs), q, k, v, grad)
    same = _gradients(lambda *t: prefusion_attention_ref(*t, **kwargs), q, k, v, grad)
    exact = _gradients(lambda *t: prefusion_attention_ref(*t, **kwargs), q.double(), k.double(), v.double(),
                       grad.double())
    for name, got, ref, truth in zip(("out", "dq", "dk", "dv"), kernel, same, exact):
        assert got.shape == truth.shape and got.dtype == q.dtype, name
        assert not got.isnan().any(), f"{name}: NaN (an element not written, or 0/0)"
        kernel_err = (got.double() - truth).abs().max().item()
        torch_err = (ref.double() - truth).abs().max().item()
        assert kernel_err <= 2 * torch_err + atol, f"{name}: kernel error {kernel_err:.3g} vs torch {torch_err:.3g}"
    return kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "q_len,k_len,heads,kv_heads,head_dim",
    [
        (13, 29, 4, 2, 24),  # cached prefix, GQA, head dim off 16 (padded to 32)
        (29, 13, 2, 1, 40),  # more queries than keys: the first 16 rows see nothing
        (17, 17, 2, 2, 64),  # Lq == Lk, plain multi-head, several tiles
        (1, 21, 4, 1, 16),  # one decode step, 4 query heads on one kv head
    ],
)
def test_causal_gradients_match_reference(q_len, k_len, heads, kv_heads, head_dim, dtype, device):
    q, k, v, grad = _inputs([(2, q_len, heads, head_dim), (2, k_len, kv_heads, head_dim),
                             (2, k_len, kv_heads, head_dim), (2, q_len, heads, head_dim)], dtype, device)
    atol = 1e-5 if dtype == torch.float32 else 1e-3
    _, dq, dk, dv = _assert_gradients_within_twice_torch_error(q, k, v, grad, atol=atol)
    if q_len > k_len:  # rows that see no key: zero output, so zero gradient into q
        assert (dq[:, : q_len - k_len] == 0).all()


def test_non_causal_gradients_match_reference(device):
    q, k, v, grad = _inputs([(2, 11, 4, 24), (2, 19, 2, 24), (2, 19, 2, 24), (2, 11, 4, 24)], torch.float32, device)
    _assert_gradients_within_twice_torch_error(q, k, v, grad, causal=False)


def test_key_padding_gradients_match_reference(device):
    q, k, v, grad = _inputs([(3, 9, 2, 24), (3, 21, 1, 24), (3, 21, 1, 24), (3, 9, 2, 24)], torch.float32, device)
    keep = torch.rand(3, 21, generator=torch.Generator().manual_seed(1)) > 0.4
    keep[1] = False  # a sequence whose keys are all padding: zero output, zero gradients
    keep = keep.to(device)
    _, dq, dk, dv = _assert_gradients_within_twice_torch_error(q, k, v, grad, key_padding_mask=keep)
    assert (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
    assert (dk[~keep] == 0).all() and (dv[~keep] == 0).all()  # padded keys get no gradient


def test_packed_gradients_match_reference(device):
    lengths_q, lengths_k = [5, 0, 9, 3], [7, 0, 12, 3]  # an empty sequence in the middle
    cu_q, cu_k = (torch.tensor([0, *itertools.accumulate(n)], dtype=torch.int32, device=device)
                  for n in (lengths_q, lengths_k))
    q, k, v, grad = _inputs([(17, 4, 24), (22, 2, 24), (22, 2, 24), (17, 4, 24)], torch.float32, device)
    _assert_gradients_within_twice_torch_error(q, k, v, grad, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


def test_strided_inputs_give_the_contiguous_gradients(device):
    # transformers' layout: [B, H, L, d] transposed to [B, L, H, d] (a view, not contiguous)
    q, k, v, grad = _inputs([(2, 4, 13, 24), (2, 2, 19, 24), (2, 2, 19, 24), (2, 13, 4, 24)], torch.float32, device)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    assert not q.is_contiguous()
    _assert_gradients_within_twice_torch_error(q, k, v, grad)


def test_flop_counter_counts_forward_and_backward(device):
    heads, head_dim = 4, 24
    q, k, v = _inputs([(2, 13, heads, head_dim), (2, 29, 2, head_dim), (2, 29, 2, head_dim)], torch.float32, device)
    q.requires_grad_()
    with FlopCounterMode(display=False) as counter:
        prefusion_attention(q, k, v).sum().backward()
    pairs = 2 * int(causal_mask(13, 29).sum())
    counts = counter.get_flop_counts()["Global"]
    assert counts[torch.ops.llava_mini.prefusion_attention] == 4 * head_dim * heads * pairs
    assert counts[torch.ops.llava_mini.prefusion_attention_backward] == 14 * head_dim * heads * pairs


def test_backward_opcheck(device):
    q, k, v, grad = _inputs([(2, 5, 2, 16), (2, 9, 1, 16), (2, 9, 1, 16), (2, 5, 2, 16)], torch.float32, device)
    keep = torch.ones(2, 9, dtype=torch.bool, device=device)
    out, lse = torch.ops.llava_mini.prefusion_attention(q, k, v, keep, None, None, 0, True, 0.25)
    torch.library.opcheck(torch.ops.llava_mini.prefusion_attention_backward.default,
                          (grad, q, k, v, out, lse, keep, None, None, 0, True, 0.25))
    # the forward op with inputs that require grad: opcheck checks the autograd registration too
    torch.library.opcheck(torch.ops.llava_mini.prefusion_attention.default,
                          (q.requires_grad_(), k, v, None, None, None, 0, True, 0.25))


def test_compiled_backward_matches_eager(device):
    q, k, v, grad = _inputs([(1, 7, 2, 16), (1, 11, 1, 16), (1, 11, 1, 16), (1, 7, 2, 16)], torch.float32, device)
    eager = _gradients(prefusion_attention, q, k, v, grad)
    compiled = _gradients(torch.compile(prefusion_attention, backend="aot_eager", fullgraph=True), q, k, v, grad)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.gpu
def test_bf16_gradients_match_reference(device):
    q, k, v, grad = _inputs([(2, 77, 8, 128), (2, 301, 8, 128), (2, 301, 8, 128), (2, 77, 8, 128)],
                            torch.bfloat16, device)
    _assert_gradients_within_twice_torch_error(q, k, v, grad, atol=1e-2)
