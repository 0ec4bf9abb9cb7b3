"""Pre-fusion attention kernel vs an fp64 reference (the kernel may err at most ~2x the same-dtype PyTorch path)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from llava_mini.kernels.prefusion import causal_pairs, prefusion_attention, prefusion_attention_ref
from llava_mini.kernels.prefusion.ref import causal_mask
from llava_mini.kernels.prefusion.triton import prefusion_attention_triton

CPU_DTYPES = [torch.float32, torch.float16]


def _inputs(batch, q_len, k_len, heads, kv_heads, head_dim, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_len, heads, head_dim, generator=gen).to(device, dtype)
    k = torch.randn(batch, k_len, kv_heads, head_dim, generator=gen).to(device, dtype)
    v = torch.randn(batch, k_len, kv_heads, head_dim, generator=gen).to(device, dtype)
    return q, k, v


def _assert_within_twice_torch_error(out, q, k, v, atol=1e-5, **kwargs):
    """|kernel - fp64| <= 2 * |same-dtype reference - fp64| + atol."""
    ref64 = prefusion_attention_ref(q.double(), k.double(), v.double(), **kwargs)
    ref_same = prefusion_attention_ref(q, k, v, **kwargs)
    assert out.shape == ref64.shape and out.dtype == q.dtype
    assert not out.isnan().any()
    kernel_err = (out.double() - ref64).abs().max().item()
    torch_err = (ref_same.double() - ref64).abs().max().item()
    assert kernel_err <= 2 * torch_err + atol, f"kernel error {kernel_err:.3g} vs torch error {torch_err:.3g}"


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize(
    "q_len,k_len,heads,kv_heads,head_dim",
    [
        (23, 37, 4, 2, 64),  # cached prefix: queries are the last 23 of 37 keys
        (37, 37, 4, 4, 16),  # Lq == Lk, plain multi-head
        (7, 23, 4, 1, 72),  # head_dim 72 padded to 128 in SRAM; 4 heads share one KV head
        (1, 37, 4, 2, 16),  # one decode step
        (37, 23, 2, 1, 16),  # more queries than keys: the first 14 rows see nothing -> zeros
    ],
)
def test_causal_matches_reference(q_len, k_len, heads, kv_heads, head_dim, dtype, device):
    q, k, v = _inputs(2, q_len, k_len, heads, kv_heads, head_dim, dtype, device)
    out = prefusion_attention(q, k, v)
    _assert_within_twice_torch_error(out, q, k, v)
    if q_len > k_len:
        assert (out[:, : q_len - k_len] == 0).all()


def test_non_causal_matches_reference(device):
    q, k, v = _inputs(2, 23, 37, 4, 2, 16, torch.float32, device)
    out = prefusion_attention(q, k, v, causal=False)
    _assert_within_twice_torch_error(out, q, k, v, causal=False)


def test_head_dim_128(device):
    q, k, v = _inputs(1, 7, 19, 2, 1, 128, torch.float16, device)
    _assert_within_twice_torch_error(prefusion_attention(q, k, v), q, k, v)


@pytest.mark.parametrize("causal", [True, False])
def test_key_padding_mask_with_an_empty_row(causal, device):
    q, k, v = _inputs(3, 23, 37, 4, 2, 16, torch.float16, device)
    keep = torch.rand(3, 37, generator=torch.Generator().manual_seed(1)) > 0.4
    keep[0] = False  # sequence 0 has no valid key at all: its rows must be zeros, not NaN
    keep[1, :20] = False  # left padding: with the causal mask, early rows of sequence 1 see nothing
    keep = keep.to(device)
    out = prefusion_attention(q, k, v, key_padding_mask=keep, causal=causal)
    _assert_within_twice_torch_error(out, q, k, v, key_padding_mask=keep, causal=causal)
    assert (out[0] == 0).all()


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_varlen_matches_each_sequence(dtype, device):
    lengths_q, lengths_k = [5, 23, 1, 0, 17], [19, 23, 37, 4, 17]
    heads, kv_heads, head_dim = 4, 2, 16
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(sum(lengths_q), heads, head_dim, generator=gen).to(device, dtype)
    k = torch.randn(sum(lengths_k), kv_heads, head_dim, generator=gen).to(device, dtype)
    v = torch.randn(sum(lengths_k), kv_heads, head_dim, generator=gen).to(device, dtype)
    cu_q = torch.tensor([0] + lengths_q, device=device).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lengths_k, device=device).cumsum(0).to(torch.int32)
    out = prefusion_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    _assert_within_twice_torch_error(out, q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    # The packed reference is itself a loop; check one sequence against the padded layout too.
    q1, k1, v1 = q[5:28].unsqueeze(0), k[19:42].unsqueeze(0), v[19:42].unsqueeze(0)
    torch.testing.assert_close(out[5:28], prefusion_attention(q1, k1, v1)[0])


def test_non_contiguous_inputs(device):
    # Transformers' layout [B, H, L, d] transposed to [B, L, H, d], and K/V sliced from a fused KV tensor.
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 23, 16, generator=gen).to(device).transpose(1, 2)
    kv = torch.randn(2, 37, 2, 2, 24, generator=gen).to(device)
    k, v = kv[:, :, 0, :, :16], kv[:, :, 1, :, 4:20]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    out = prefusion_attention(q, k, v)
    _assert_within_twice_torch_error(out, q, k, v)


def test_output_is_fully_written(device):
    q, k, v = _inputs(2, 23, 37, 4, 2, 72, torch.float32, device)
    keep = torch.ones(2, 37, dtype=torch.bool, device=device)
    keep[1] = False
    out = torch.full_like(q, float("nan"))
    result = prefusion_attention_triton(q, k, v, key_padding_mask=keep, out=out)
    assert result is out and not out.isnan().any()
    _assert_within_twice_torch_error(out, q, k, v, key_padding_mask=keep)


def test_causal_pairs_matches_mask():
    for q_len, k_len in [(1, 1), (7, 23), (23, 23), (37, 23), (0, 5), (5, 0)]:
        assert causal_pairs(q_len, k_len) == int(causal_mask(q_len, k_len).sum())


def test_flop_formula_counts_visible_pairs(device):
    heads, head_dim = 4, 16
    q, k, v = _inputs(2, 7, 23, heads, 2, head_dim, torch.float32, device)
    with FlopCounterMode(display=False) as counter:
        prefusion_attention(q, k, v)
    assert counter.get_total_flops() == 2 * int(causal_mask(7, 23).sum()) * 4 * head_dim * heads

    lengths_q, lengths_k = [3, 9], [11, 9]
    cu_q = torch.tensor([0, 3, 12], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 11, 20], dtype=torch.int32, device=device)
    qp, kp, vp = q.reshape(-1, heads, head_dim)[:12], k.reshape(-1, 2, head_dim)[:20], v.reshape(-1, 2, head_dim)[:20]
    with FlopCounterMode(display=False) as counter:
        prefusion_attention(qp, kp, vp, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    pairs = sum(int(causal_mask(lq, lk).sum()) for lq, lk in zip(lengths_q, lengths_k))
    assert counter.get_total_flops() == pairs * 4 * head_dim * heads


def test_opcheck(device):
    q, k, v = _inputs(2, 5, 9, 2, 1, 16, torch.float32, device)
    keep = torch.ones(2, 9, dtype=torch.bool, device=device)
    op = torch.ops.llava_mini.prefusion_attention.default
    torch.library.opcheck(op, (q, k, v, keep, None, None, 0, True, 0.25))
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=device)
    torch.library.opcheck(op, (q.reshape(-1, 2, 16), k.reshape(-1, 1, 16)[:10], v.reshape(-1, 1, 16)[:10],
                               None, cu, cu, 6, True, 0.25))


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda q, k, v: (q, k[:, :, :1].expand(-1, -1, 3, -1), v[:, :, :1].expand(-1, -1, 3, -1)), ValueError,
         "kv heads"),
        (lambda q, k, v: (q, k.half(), v), TypeError, "one dtype"),
        (lambda q, k, v: (q.int(), k.int(), v.int()), TypeError, "q: expected dtype"),
        (lambda q, k, v: (q, k[..., :8], v[..., :8]), ValueError, "head_dim"),
        (lambda q, k, v: (q, k, v[:, :5]), ValueError, "v: expected the shape of k"),
        (lambda q, k, v: (q[0], k, v), ValueError, r"q: expected \[batch, seq, heads, head_dim\]"),
        (lambda q, k, v: (q, k.to("meta"), v), ValueError, "k: expected a tensor on q's device"),
    ],
)
def test_bad_inputs_raise(change, error, match, device):
    q, k, v = _inputs(2, 5, 9, 4, 2, 16, torch.float32, device)
    with pytest.raises(error, match=match):
        prefusion_attention(*change(q, k, v))


def test_bad_masks_and_cu_seqlens_raise(device):
    q, k, v = _inputs(2, 5, 9, 4, 2, 16, torch.float32, device)
    with pytest.raises(ValueError, match=r"key_padding_mask: expected bool \[2, 9\]"):
        prefusion_attention(q, k, v, key_padding_mask=torch.ones(2, 5, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match="key_padding_mask: expected bool"):
        prefusion_attention(q, k, v, key_padding_mask=torch.ones(2, 9, device=device))
    qp, kp, vp = q.reshape(10, 4, 16), k.reshape(18, 2, 16), v.reshape(18, 2, 16)
    good = torch.tensor([0, 4, 10], dtype=torch.int32, device=device)
    good_k = torch.tensor([0, 9, 18], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="cu_seqlens_q: expected non-decreasing offsets .* packed length 10,"):
        prefusion_attention(qp, kp, vp, cu_seqlens_q=torch.tensor([0, 4, 9], dtype=torch.int32, device=device),
                            cu_seqlens_k=good_k)
    with pytest.raises(ValueError, match="cu_seqlens_k: expected int32"):
        prefusion_attention(qp, kp, vp, cu_seqlens_q=good, cu_seqlens_k=good_k.long())
    with pytest.raises(ValueError, match="both or neither"):
        prefusion_attention(qp, kp, vp, cu_seqlens_q=good)
    with pytest.raises(ValueError, match="backend: expected one of"):
        prefusion_attention(q, k, v, backend="sdpa")


@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv_heads", [(32, 32), (32, 8)])
@pytest.mark.parametrize("q_len", [577 + 32, 32])
def test_prefusion_shapes_bf16(heads, kv_heads, q_len, device):
    q, k, v = _inputs(4, q_len, 577 + 32, heads, kv_heads, 128, torch.bfloat16, device)
    keep = torch.ones(4, 577 + 32, dtype=torch.bool, device=device)
    keep[1, :50] = False
    out = prefusion_attention(q, k, v, key_padding_mask=keep)
    _assert_within_twice_torch_error(out, q, k, v, key_padding_mask=keep)


@pytest.mark.gpu
def test_repeated_calls_are_bitwise_identical(device):
    q, k, v = _inputs(4, 577 + 32, 577 + 32, 32, 8, 128, torch.bfloat16, device)
    first = prefusion_attention(q, k, v)
    for _ in range(5):
        assert torch.equal(prefusion_attention(q, k, v), first)


@pytest.mark.gpu
def test_varlen_prefusion_shapes_bf16(device):
    lengths = [577 + 32, 577 + 128, 577 + 5]  # ragged prompts packed without padding
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(sum(lengths), 32, 128, generator=gen).to(device, torch.bfloat16)
    k = torch.randn(sum(lengths), 8, 128, generator=gen).to(device, torch.bfloat16)
    v = torch.randn(sum(lengths), 8, 128, generator=gen).to(device, torch.bfloat16)
    cu = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
    out = prefusion_attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu)
    _assert_within_twice_torch_error(out, q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu)


class _GridSpy:
    """Stands in for an autotuned kernel: records the grid's second axis of each launch, then launches."""

    def __init__(self, kernel):
        self.kernel, self.grid_rows = kernel, []

    def __getitem__(self, grid):
        self.grid_rows.append(grid({"BLOCK_M": 16})[1])
        return self.kernel[grid]


def _spy_on_launches(monkeypatch, dtype):
    import llava_mini.kernels.prefusion.triton as kernel

    name = "_fp32_kernel" if dtype == torch.float32 else "_half_kernel"
    spy = _GridSpy(getattr(kernel, name))
    monkeypatch.setattr(kernel, name, spy)
    return spy


def test_batches_beyond_the_grid_limit_are_launched_in_slices(monkeypatch, device):
    """batch x heads over CUDA's 65535 grid rows: the launcher slices the batch (limit lowered here)."""
    import llava_mini.kernels.prefusion.triton as kernel

    monkeypatch.setattr(kernel, "MAX_GRID_Y", 4)
    spy = _spy_on_launches(monkeypatch, torch.float32)
    torch.manual_seed(0)
    q = torch.randn(5, 7, 2, 16, device=device)
    k = torch.randn(5, 9, 1, 16, device=device)
    v = torch.randn(5, 9, 1, 16, device=device)
    keep = torch.rand(5, 9, device=device) > 0.3
    out = kernel.prefusion_attention_triton(q, k, v, key_padding_mask=keep)
    want = prefusion_attention_ref(q.double(), k.double(), v.double(), key_padding_mask=keep)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=0)
    assert spy.grid_rows == [4, 4, 2]


def test_packed_batches_beyond_the_grid_limit_are_launched_in_slices(monkeypatch, device):
    """The packed (varlen) path slices its sequences the same way: 5 sequences x 2 heads, 4 rows a launch."""
    import llava_mini.kernels.prefusion.triton as kernel

    monkeypatch.setattr(kernel, "MAX_GRID_Y", 4)
    spy = _spy_on_launches(monkeypatch, torch.float32)
    lengths_q, lengths_k = [5, 3, 1, 0, 4], [6, 3, 9, 2, 4]
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(sum(lengths_q), 2, 16, generator=gen).to(device)
    k = torch.randn(sum(lengths_k), 1, 16, generator=gen).to(device)
    v = torch.randn(sum(lengths_k), 1, 16, generator=gen).to(device)
    cu_q = torch.tensor([0] + lengths_q, device=device).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lengths_k, device=device).cumsum(0).to(torch.int32)
    out = torch.full_like(q, float("nan"))
    kernel.prefusion_attention_triton(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=5, out=out)
    want = prefusion_attention_ref(q.double(), k.double(), v.double(), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=0)
    assert spy.grid_rows == [4, 4, 2]


@pytest.mark.parametrize("head_dim,padded", [(72, 80), (20, 32), (64, 64)])
def test_head_dims_reach_the_kernel_in_16_element_rows(head_dim, padded, device):
    """Rows of a multiple of 16 elements (aligned, so loads vectorise): others are zero-padded, exactly."""
    import llava_mini.kernels.prefusion.triton as kernel
    from llava_mini.kernels.aot import record_launches

    q, k, v = _inputs(2, 23, 37, 4, 2, head_dim, torch.float32, device)
    [launch] = record_launches(kernel, kernel.prefusion_attention_triton, q, k, v)
    assert launch.args["HEAD_DIM"] == padded
    for name, given in (("Q", q), ("K", k), ("V", v)):
        t = launch.args[name]
        assert t.data_ptr() % 16 == 0 and all(stride % 16 == 0 for stride in t.stride()[:-1])
        assert torch.equal(t[..., :head_dim], given) and not t[..., head_dim:].any()
        assert (t.data_ptr() == given.data_ptr()) == (padded == head_dim)  # aligned inputs are not copied
    out = torch.full_like(q, float("nan"))
    kernel.prefusion_attention_triton(q, k, v, out=out)
    _assert_within_twice_torch_error(out, q, k, v)


def test_no_fitting_config_names_the_arch_dtype_and_alternative():
    """A head dim no config fits in shared memory: a clear error instead of OutOfResources at launch."""
    import llava_mini.kernels.prefusion.triton as kernel

    assert kernel.select_configs(torch.float32, 64, 86, 99 * 1024)
    with pytest.raises(ValueError, match=r"sm_86.*float32 at head_dim 4096.*use backend='torch'"):
        kernel.select_configs(torch.float32, 4096, 86, 99 * 1024)
    # Where the 16-bit tiles fit and the fp32 ones do not, the error says so.
    dim = next(d for d in (256, 512, 1024, 2048) if kernel.select_configs(torch.bfloat16, d, 86, 99 * 1024)
               and not kernel.fitting_configs(kernel.FP32_CONFIGS, torch.float32, d, 86, 99 * 1024))
    with pytest.raises(ValueError, match=r"sm_86.*float32 at head_dim .*use bfloat16 or float16 inputs"):
        kernel.select_configs(torch.float32, dim, 86, 99 * 1024)
