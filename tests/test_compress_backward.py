"""The fused compressor's backward against an fp64 reference: the gradient of x and of every weight,
both forms, every option, odd shapes; each error at most 2x the same-dtype PyTorch path's error plus a
small atol (flash-attention's rule); the kernel's buffers start as NaN."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from llava_mini.kernels.compress import backward as kernel_backward
from llava_mini.kernels.compress import compress, compress_ref, sincos_pos_embed_2d
from llava_mini.kernels.compress import triton as fused
from llava_mini.kernels.compress.op import absorbed_attention_op

WEIGHT_NAMES = ("query", "pos_embed", "in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias",
                "ln_q_weight", "ln_q_bias", "ln_kv_weight", "ln_kv_bias")


@pytest.fixture(autouse=True)
def nan_poisoned_buffers(monkeypatch):
    """Every buffer the forward and backward kernels write starts as NaN: an unwritten element shows."""
    def poisoned(shape, dtype, device):
        return torch.full(shape, math.nan, dtype=dtype, device=device)
    monkeypatch.setattr(kernel_backward, "new_gradient", poisoned)
    monkeypatch.setattr(fused, "_empty", poisoned)
    fused.clear_cache()


def make_weights(dim, num_queries, grid, seed=0):
    """Random fp32 weights (non-trivial LayerNorm affines and biases); ``query`` [Q, D], the position
    table [grid*grid, D] (random, so its gradient is not special), [Q, D] when Q == grid*grid."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g) * scale + shift

    return [rand(num_queries, dim, scale=0.5), rand(grid * grid, dim, scale=0.5),
            rand(3 * dim, dim, scale=dim ** -0.5), rand(3 * dim, scale=0.1),
            rand(dim, dim, scale=dim ** -0.5), rand(dim, scale=0.1),
            rand(dim, scale=0.1, shift=1.0), rand(dim, scale=0.1), rand(dim, scale=0.1, shift=1.0), rand(dim, scale=0.1)]


def gradients(fn, x, weights, grad, x_grad=True, **options):
    """(out, dx, d each weight) of ``fn`` with incoming gradient ``grad`` (None where no gradient)."""
    x = x.detach().clone().requires_grad_(x_grad)
    weights = [w.detach().clone().requires_grad_() if w is not None else None for w in weights]
    out = fn(x, *weights, **options)
    out.backward(grad)
    return [out.detach(), x.grad] + [w.grad if w is not None else None for w in weights]


def assert_within_twice_torch_error(x, weights, grad, num_heads, atol=1e-5, x_grad=True, **options):
    """The fused path's out and gradients against fp64: |fused - fp64| <= 2 |same-dtype ref - fp64| + atol."""
    def fused_path(x, *w, **o):
        return compress(x, *w, num_heads, 1e-5, **o)

    def reference(x, *w, **o):
        return compress_ref(x, *w, num_heads, 1e-5, **o)

    dtype = x.dtype
    got = gradients(fused_path, x, [w.to(dtype) if w is not None else None for w in weights], grad, x_grad, **options)
    same = gradients(reference, x, [w.to(dtype) if w is not None else None for w in weights], grad, x_grad, **options)
    exact = gradients(reference, x.double(), [w.double() if w is not None else None for w in weights], grad.double(),
                      x_grad, **options)
    names = ("out", "x") + WEIGHT_NAMES
    compared = 0
    for name, g, s, e in zip(names, got, same, exact):
        if e is None:
            assert g is None, f"{name}: a gradient where the reference has none"
            continue
        assert g is not None and g.shape == e.shape and g.dtype == dtype, name
        assert not g.isnan().any(), f"{name}: NaN (an element not written, or 0/0)"
        fused_err = (g.double() - e).abs().max().item()
        torch_err = (s.double() - e).abs().max().item()
        assert fused_err <= 2 * torch_err + atol * max(1.0, e.abs().max().item()), \
            f"{name}: fused error {fused_err:.3g} vs torch {torch_err:.3g}"
        compared += 1
    return compared


# (dim, heads, Q, N): LLaVA-Mini's C*C queries, the position table [Q, D] on the queries and resized
# to the keys' grid. 1 and 4 queries run absorbed; 9 queries x 4 heads projected.
ABSORBED = (40, 2, 1, 25)
ABSORBED_4Q = (24, 4, 4, 36)  # D=24: channels padded to 32; N=36 not a multiple of 16
PROJECTED = (40, 4, 9, 25)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16,
                                   pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])  # no bf16 in the interpreter
@pytest.mark.parametrize("shape", [ABSORBED, ABSORBED_4Q, PROJECTED], ids=["absorbed", "absorbed-4q", "projected"])
def test_every_gradient_matches_fp64(shape, dtype, device, monkeypatch):
    dim, heads, num_queries, n = shape
    if shape is PROJECTED:
        monkeypatch.setattr(fused, "choose_form", lambda *args: "projected")
    x = torch.randn(3, n, dim, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    weights = [w.to(device) for w in make_weights(dim, num_queries, math.isqrt(num_queries))]
    grad = torch.randn(3, num_queries, dim, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    atol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert assert_within_twice_torch_error(x, weights, grad, heads, atol=atol) == 12


@pytest.mark.parametrize("form", ["absorbed", "projected"])
@pytest.mark.parametrize("case", ["key_padding_mask", "ragged_sincos", "packed_sincos", "resize_rectangle",
                                  "float_attn_mask", "bool_attn_mask_per_head", "strided_x", "splits",
                                  "frozen_x"])
def test_options_and_layouts(case, form, device, monkeypatch):
    """Every option the forward takes, both forms (forced), fp32: the position table's gradient comes
    through the keys (resized, or none with sin-cos keys)."""
    monkeypatch.setattr(fused, "choose_form", lambda *args: form)
    dim, heads, num_queries, batch = 32, 2, 1, 3
    weights = [w.to(device) for w in make_weights(dim, num_queries, 5)]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 25, dim, generator=gen).to(device)
    options, x_grad = {}, True
    if case == "key_padding_mask":
        mask = torch.zeros(batch, 25, dtype=torch.bool)
        mask[0, :18] = True  # most of an image, a whole 16-row tile
        mask[1, 7::3] = True
        options = dict(key_padding_mask=mask.to(device))
    elif case == "ragged_sincos":  # MiniCPM-V: images of their own grids, sin-cos keys, no query table
        options = dict(query_pos=False, key_pos="sincos", grid_sizes=torch.tensor([[5, 5], [3, 7], [2, 4]]))
    elif case == "packed_sincos":
        sizes = torch.tensor([[3, 5], [5, 5], [1, 6]])
        lengths = (sizes[:, 0] * sizes[:, 1]).tolist()
        x = torch.randn(sum(lengths), dim, generator=gen).to(device)
        options = dict(query_pos=False, key_pos="sincos", grid_sizes=sizes,
                       cu_seqlens=torch.tensor([0] + lengths).cumsum(0).to(torch.int32))
    elif case == "resize_rectangle":  # one non-square grid for the batch: the table resized to it
        x = torch.randn(batch, 24, dim, generator=gen).to(device)
        options = dict(grid_sizes=torch.tensor([[4, 6]] * batch))
    elif case == "float_attn_mask":
        options = dict(attn_mask=torch.randn(num_queries, 25, generator=gen).to(device))
    elif case == "bool_attn_mask_per_head":
        allowed = torch.rand(batch * heads, num_queries, 25, generator=gen) < 0.3
        allowed[..., 0] = False  # every (image, head) keeps a key
        options = dict(attn_mask=allowed.to(device))
    elif case == "strided_x":
        x = torch.randn(batch, dim, 25, generator=gen).to(device).transpose(1, 2)
    elif case == "splits":  # several programs per image, merged in the forward; each its own dA
        monkeypatch.setattr(fused, "wave_slots", lambda device: 8)
    elif case == "frozen_x":  # a frozen vision tower: x needs no gradient, the kernel writes no dx
        x_grad = False
    options.setdefault("query_pos", False)  # the 5 x 5 table serves the keys only (MiniCPM-V 2.0's layout)
    grad = torch.randn(batch, num_queries, dim, generator=gen).to(device)
    compared = assert_within_twice_torch_error(x, weights, grad, heads, x_grad=x_grad, **options)
    assert compared >= (9 if x_grad else 8)


def test_absorbed_op_is_registered_with_autograd_and_fake(device):
    """opcheck: schema, fake, autograd registration and the backward op on a tiny case."""
    dim, hq = 24, 16
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 20, dim, generator=gen).to(device).requires_grad_()
    queries = (torch.randn(hq, dim, generator=gen) * 0.3).to(device).requires_grad_()
    table = torch.randn(20, hq, generator=gen).to(device).requires_grad_()
    torch.library.opcheck(absorbed_attention_op, (x, queries, table, None, None, None, None, 1e-5),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_flop_counter_sees_forward_and_backward(device):
    dim, heads, num_queries = 32, 2, 1
    weights = [w.to(device).requires_grad_() for w in make_weights(dim, num_queries, 5)]
    weights[1] = torch.randn(25, dim).to(device).requires_grad_()
    x = torch.randn(2, 25, dim).to(device).requires_grad_()
    counter = FlopCounterMode(display=False)
    with counter:
        out = compress(x, *weights, heads, 1e-5, query_pos=False)
        out.sum().backward()
    counts = counter.get_flop_counts()["Global"]
    rows, hq = 2 * 25, heads * num_queries
    assert counts[torch.ops.llava_mini.absorbed_attention] == 4 * rows * dim * hq
    assert counts[torch.ops.llava_mini.absorbed_attention_backward] == kernel_backward.backward_flops(rows, dim, hq)
    assert x.grad is not None and not x.grad.isnan().any()


def test_weights_trained_through_the_kernel_change_the_next_forward(device):
    """An optimizer step on the weights refreshes the forward's cache: training and inference agree."""
    dim, heads = 32, 2
    weights = [torch.nn.Parameter(w.to(device)) for w in make_weights(dim, 1, 5)]
    weights[1] = torch.nn.Parameter(sincos_pos_embed_2d(dim, 5).to(device))
    x = torch.randn(2, 25, dim).to(device)
    optimizer = torch.optim.SGD(weights, lr=0.5)
    with torch.no_grad():
        before = compress(x, *weights, heads, query_pos=False)
    compress(x, *weights, heads, query_pos=False).square().sum().backward()
    optimizer.step()
    with torch.no_grad():
        after = compress(x, *weights, heads, query_pos=False)
        expected = compress_ref(x, *[w.detach() for w in weights], heads, query_pos=False)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-5)
