"""The fused compressor (issue 3) against the fp64 reference, on CPU under TRITON_INTERPRET=1.

Accuracy rule (flash-attention's): the fused error against an fp64 reference is at most twice
the error of the same-dtype PyTorch path, plus a small absolute slack.
"""

import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from llava_mini.kernels import backend
from llava_mini.kernels.compress import (FusedResampler, choose_form, compress, compress_flops, compress_ref,
                                         compress_triton, key_pos_embed, sincos_pos_embed_2d)
from llava_mini.kernels.compress import triton as fused
from llava_mini.lmm.compressor import Resampler

WEIGHT_NAMES = ("query", "pos_embed", "in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias",
                "ln_q_weight", "ln_q_bias", "ln_kv_weight", "ln_kv_bias")


def make_weights(dim, grid, seed=0, device="cpu"):
    """Random fp32 weights with non-trivial LayerNorm affine parameters and biases."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device)

    return [
        rand(grid * grid, dim, scale=0.5),
        sincos_pos_embed_2d(dim, grid).to(device),
        rand(3 * dim, dim, scale=dim ** -0.5),
        rand(3 * dim, scale=0.1),
        rand(dim, dim, scale=dim ** -0.5),
        rand(dim, scale=0.1),
        rand(dim, scale=0.1, shift=1.0),
        rand(dim, scale=0.1),
        rand(dim, scale=0.1, shift=1.0),
        rand(dim, scale=0.1),
    ]


def make_x(batch, n, dim, dtype, layout, seed=1):
    """x [B, N, D] as a contiguous tensor, a transposed view, or a strided slice."""
    g = torch.Generator().manual_seed(seed)
    if layout == "transposed":
        x = torch.randn(batch, dim, n, generator=g).transpose(1, 2)
    elif layout == "sliced":
        x = torch.randn(batch, n + 3, 2 * dim, generator=g)[:, 2:n + 2, ::2]
    else:
        x = torch.randn(batch, n, dim, generator=g)
    return (x * 2 + 0.5).to(dtype)  # a non-zero mean, as CLIP features have


def assert_close_to_fp64(out, x, weights, num_heads, eps=1e-6, **options):
    """flash-attention's rule: |out - ref64| <= 2 |ref_same_dtype - ref64| + small atol."""
    double = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in options.items()}
    ref64 = compress_ref(x.double(), *[w.double() if w is not None else None for w in weights], num_heads, eps, **double)
    ref_same = compress_ref(x, *weights, num_heads, eps, **options)
    assert out.shape == ref64.shape and out.dtype == x.dtype
    assert not out.isnan().any()
    fused_error = (out.double() - ref64).abs().max().item()
    ref_error = (ref_same.double() - ref64).abs().max().item()
    atol = 1e-5 if x.dtype == torch.float32 else 1e-3
    assert fused_error <= 2 * ref_error + atol, (fused_error, ref_error)


@pytest.fixture
def poisoned_workspace(monkeypatch):
    """Every internal buffer the fused path allocates starts as NaN, so unwritten parts show."""
    monkeypatch.setattr(fused, "_empty", lambda shape, dtype, device: torch.full(shape, math.nan, dtype=dtype,
                                                                                  device=device))


CASES = [  # batch, n, dim, heads, grid, layout
    (1, 9, 40, 2, 1, "contiguous"),
    (3, 25, 72, 4, 2, "transposed"),
    (2, 49, 72, 3, 3, "sliced"),
    (17, 25, 40, 4, 1, "transposed"),  # more images than rows per block
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("form,splits", [("absorbed", 1), ("absorbed", 3), ("projected", None)])
@pytest.mark.parametrize("batch,n,dim,heads,grid,layout", CASES)
def test_fused_matches_fp64_reference(batch, n, dim, heads, grid, layout, form, splits, dtype, device,
                                      poisoned_workspace):
    weights = [w.to(device) for w in make_weights(dim, grid)]
    x = make_x(batch, n, dim, dtype, layout).to(device)
    out = torch.full((batch, grid * grid, dim), math.nan, dtype=dtype, device=device)
    result = compress_triton(x, *weights, heads, 1e-6, form=form, splits=splits, out=out)
    assert result.data_ptr() == out.data_ptr()
    assert_close_to_fp64(out.cpu(), x.cpu(), [w.cpu() for w in weights], heads)


RAGGED_CASES = [  # key_pos, query_pos, (h, w) per image, layout of x, packed
    ("sincos", False, [(3, 5), (2, 2), (4, 4)], "transposed", False),  # MiniCPM-V 2.5/2.6: padded batch
    ("sincos", False, [(3, 5), (1, 1), (5, 3)], "sliced", True),  # ... packed rows
    ("sincos", True, [(2, 7), (2, 7)], "contiguous", False),  # MiniCPM-V 2.0, adaptive: non-square grid
    ("resize", True, [(7, 2), (7, 2)], "transposed", False),  # MiniCPM-V 2.0: the table resized to (h, w)
]


def ragged_x(grids, dim, dtype, layout, packed):
    """x for images of h x w tokens: padded [B, max h*w (+1), D] or packed [sum h*w, D], with cu_seqlens."""
    lengths = [h * w for h, w in grids]
    if not packed:
        return make_x(len(grids), max(lengths) + 1, dim, dtype, layout), None
    x = make_x(1, sum(lengths), dim, dtype, layout)[0]
    return x, torch.tensor([0] + lengths).cumsum(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("form,splits", [("absorbed", 1), ("absorbed", 2), ("projected", None)])
@pytest.mark.parametrize("key_pos,query_pos,grids,layout,packed", RAGGED_CASES)
def test_ragged_grids_match_fp64_reference(key_pos, query_pos, grids, layout, packed, form, splits, dtype, device,
                                           poisoned_workspace):
    dim, heads = 40, 4
    weights = [w.to(device) for w in make_weights(dim, 2)]  # 4 queries
    x, cu_seqlens = ragged_x(grids, dim, dtype, layout, packed)
    options = dict(query_pos=query_pos, key_pos=key_pos, grid_sizes=torch.tensor(grids), cu_seqlens=cu_seqlens)
    out = compress_triton(x.to(device), *weights, heads, 1e-6, form=form, splits=splits, **options)
    assert out.shape == (len(grids), 4, dim)
    assert_close_to_fp64(out.cpu(), x, [w.cpu() for w in weights], heads, **options)


def attn_masks(batch, heads, queries, n):
    g = torch.Generator().manual_seed(5)
    hidden = torch.rand(queries, n, generator=g) < 0.3
    hidden[:, 0] = False  # every query keeps a key
    return {"bool [Q, N]": hidden, "float [B*H, Q, N]": torch.randn(batch * heads, queries, n, generator=g)}


@pytest.mark.parametrize("mask_name", ["bool [Q, N]", "float [B*H, Q, N]"])
@pytest.mark.parametrize("form,splits", [("absorbed", 1), ("absorbed", 3), ("projected", None)])
def test_attn_mask_and_key_padding_mask_match_fp64_reference(mask_name, form, splits, device, poisoned_workspace):
    batch, n, dim, heads = 3, 49, 40, 4
    weights = [w.to(device) for w in make_weights(dim, 2)]
    x = make_x(batch, n, dim, torch.float32, "transposed")
    padding = torch.zeros(batch, n, dtype=torch.bool)
    padding[0, 1:20] = True  # a whole block of rows, not the first key
    padding[2, 30:] = True  # the last split
    options = dict(attn_mask=attn_masks(batch, heads, 4, n)[mask_name], key_padding_mask=padding)
    out = compress_triton(x.to(device), *weights, heads, 1e-6, form=form, splits=splits,
                          **{k: v.to(device) for k, v in options.items()})
    assert_close_to_fp64(out.cpu(), x, [w.cpu() for w in weights], heads, **options)


def test_projected_form_in_batch_chunks(device, monkeypatch, poisoned_workspace):
    batch, n, dim, heads, grid = 5, 25, 40, 4, 2
    monkeypatch.setattr(fused, "PROJECTED_CHUNK_BYTES", 2 * 3 * n * dim * 4)  # two images per chunk
    weights = [w.to(device) for w in make_weights(dim, grid)]
    x = make_x(batch, n, dim, torch.float32, "transposed").to(device)
    out = torch.full((batch, grid * grid, dim), math.nan, device=device)
    compress_triton(x, *weights, heads, 1e-6, form="projected", out=out)
    assert_close_to_fp64(out.cpu(), x.cpu(), [w.cpu() for w in weights], heads)


def test_dispatch_rule():
    # D=1024, 8 heads: C=1 and C=2 run absorbed, C=3 and C=8 projected (the register tile).
    assert choose_form(8, 1, 1024) == "absorbed"
    assert choose_form(8, 4, 1024) == "absorbed"
    assert choose_form(8, 9, 1024) == "projected"
    assert choose_form(8, 64, 1024) == "projected"
    # 16 x 2048 accumulator values plus a 16-row x tile fill a program's whole register file.
    assert choose_form(16, 1, 2048) == "projected"
    assert choose_form(16, 1, 1024) == "absorbed"


def test_register_rule():
    # Read off ptxas at D=1024: fp16/bf16 [32 + 16, 1024] values over 8 warps fit (no spills), over 16
    # warps or with a 32-row tile they spill; fp32 fits [16 + 16, 1024] at 8 and 16 warps, not [32 + 16, 1024].
    def fitting(configs, block_hq, dtype):
        return {(c.kwargs["BLOCK_N"], c.num_warps) for c in configs if fused.register_tile_fits(c, block_hq, 1024, dtype)}

    for dtype in (torch.float16, torch.bfloat16):
        assert fitting(fused.HALF_CONFIGS, 32, dtype) == {(16, 8)}
    assert fitting(fused.FP32_CONFIGS, 16, torch.float32) == {(16, 8), (16, 16)}
    assert fitting(fused.FP32_CONFIGS, 32, torch.float32) == set()


@pytest.mark.parametrize("capability,shared_memory,fp32_c1", [
    (89, 101376, "projected"),  # RTX 4090: 99 KB per program
    (80, 166912, "absorbed"),  # A100
    (90, 232448, "absorbed"),  # H100
])
def test_dispatch_rule_fits_shared_memory(capability, shared_memory, fp32_c1, monkeypatch):
    monkeypatch.setattr(fused, "device_limits", lambda device: (capability, shared_memory))
    for dtype in (torch.bfloat16, torch.float16):
        assert choose_form(8, 1, 1024, dtype, "cuda") == "absorbed"
        assert choose_form(8, 4, 1024, dtype, "cuda") == "absorbed"
    assert choose_form(8, 1, 1024, torch.float32, "cuda") == fp32_c1
    assert choose_form(8, 4, 1024, torch.float32, "cuda") == "projected"  # fits no register tile


def test_autotuner_prunes_by_the_device_shared_memory(monkeypatch):
    # The hook the autotuners run before compiling: on a 99 KB GPU the bf16 config of 32 rows x 2
    # stages (162 KB) is dropped; fp32 fits nothing there and names what to use instead.
    class FakeX:
        device = torch.device("cuda")

        def __init__(self, dtype):
            self.dtype = dtype

    monkeypatch.setattr(fused, "device_limits", lambda device: (86, 101376))
    for dtype in (torch.bfloat16, torch.float32):
        assert fused.autotuned_kernel(dtype).early_config_prune is fused._prune_configs
    block_hq, block_d = fused.block_sizes(8, 1024)
    meta = dict(BLOCK_HQ=block_hq, BLOCK_D=block_d, KEY_GRID=False)
    kept = fused._prune_configs(fused.HALF_CONFIGS, {"x_ptr": FakeX(torch.bfloat16)}, **meta)
    assert [(c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept] == [
        (16, 8, 1), (16, 8, 2), (16, 16, 1), (16, 16, 2), (32, 8, 1)]
    with pytest.raises(ValueError, match="sm_86"):
        fused._prune_configs(fused.FP32_CONFIGS, {"x_ptr": FakeX(torch.float32)}, **meta)


def test_shared_memory_rule_prunes_configs_and_names_what_to_use():
    block_hq, block_d = fused.block_sizes(8, 1024)
    kept = fused.select_configs(torch.bfloat16, block_hq, block_d, False, 86, 101376)
    assert kept and all(fused.shared_memory_bytes(c, block_hq, block_d, torch.bfloat16) <= 101376 for c in kept)
    assert len(kept) < len(fused.absorbed_configs(torch.bfloat16, block_hq, block_d))  # 32 rows x 2 stages: 162 KB
    with pytest.raises(ValueError, match=r"form: .*float32.*sm_86.*needs \d+ B.*form='projected'.*bfloat16/float16"):
        fused.select_configs(torch.float32, block_hq, block_d, False, 86, 101376)
    with pytest.raises(ValueError, match=r"form: .*accumulator does not fit"):
        fused.select_configs(torch.bfloat16, *fused.block_sizes(72, 1024), False, 90, 232448)


def test_split_rule():
    # One wave: a batch that fills the GPU's slots runs one program per image; a smaller one splits
    # its images over as many programs as fill one wave, never a second, partial wave.
    assert fused.choose_splits(4096, 576, 132) == 1
    assert fused.choose_splits(132, 576, 132) == 1
    assert fused.choose_splits(1, 576, 132) == 18  # capped at 32 rows per split
    assert fused.choose_splits(16, 576, 132) == 8  # 128 programs: 16 x 9 would need a second wave
    assert fused.choose_splits(1, 9, 132) == 1
    # Each split covers a multiple of 16 rows (no partial tile mid-image).
    assert fused.split_rows(576, 7) == 96 and fused.split_rows(9, 1) == 16


@pytest.mark.parametrize("grid,heads,form", [(1, 2, "absorbed"), (9, 4, "projected")])
def test_public_op_picks_form_by_shape(grid, heads, form, device, monkeypatch):
    dim, n = 72, 25
    assert choose_form(heads, grid * grid, dim) == form
    ran = []
    for name in ("_absorbed_heads", "projected_heads"):
        original = getattr(fused, name)
        monkeypatch.setattr(fused, name, lambda *a, _f=original, _n=name, **k: (ran.append(_n), _f(*a, **k))[1])
    weights = [w.to(device) for w in make_weights(dim, grid)]
    x = make_x(2, n, dim, torch.float32, "contiguous").to(device)
    with torch.no_grad():
        out = compress(x, *weights, heads)
    assert ran == [{"absorbed": "_absorbed_heads", "projected": "projected_heads"}[form]]
    assert_close_to_fp64(out.cpu(), x.cpu(), [w.cpu() for w in weights], heads)


def count_derivations(monkeypatch):
    calls = []
    original = fused.derive_weights
    monkeypatch.setattr(fused, "derive_weights", lambda *a, **k: (calls.append(1), original(*a, **k))[1])
    return calls


def test_cache_reused_and_refreshed_after_in_place_edit(device, monkeypatch):
    fused.clear_cache()
    calls = count_derivations(monkeypatch)
    model = Resampler(2, 40, 4).to(device).eval()
    x = make_x(2, 25, 40, torch.float32, "contiguous").to(device)
    with torch.no_grad(), backend.use_backend("triton"):
        before = model(x)
        model(x)
        assert len(calls) == 1  # the second call reuses the weight-derived tensors
        for parameter in (model.attn.in_proj_weight, model.ln_kv.weight, model.query):
            parameter.mul_(1.5)  # an optimizer-style in-place edit
            fused_out = model(x)
            with backend.use_backend("torch"):
                ref_out = model(x)
            torch.testing.assert_close(fused_out, ref_out, atol=1e-5, rtol=1e-4)
    assert len(calls) == 4
    assert not torch.allclose(before, fused_out, atol=1e-3)


def test_cache_refreshed_after_load_state_dict(device):
    model = Resampler(2, 40, 4).to(device).eval()
    other = Resampler(2, 40, 4).to(device).eval()
    x = make_x(2, 25, 40, torch.float32, "contiguous").to(device)
    with torch.no_grad(), backend.use_backend("triton"):
        model(x)
        model.load_state_dict(other.state_dict())
        fused_out = model(x)
        expected = other(x)
    torch.testing.assert_close(fused_out, expected, atol=1e-5, rtol=1e-4)


def test_cache_not_fooled_by_a_reused_address(device):
    # Fresh weights may land at a freed tensor's address with the same _version.
    x = make_x(2, 9, 40, torch.float32, "contiguous").to(device)
    for seed in range(3):
        weights = [w.to(device) for w in make_weights(40, 1, seed=seed)]
        assert_close_to_fp64(compress_triton(x, *weights, 2).cpu(), x.cpu(), [w.cpu() for w in weights], 2)
        del weights


def test_resampler_triton_backend_equals_torch(device, monkeypatch):
    calls = count_derivations(monkeypatch)
    model = Resampler(2, 72, 4).to(device).eval()
    x = make_x(3, 49, 72, torch.float32, "sliced").to(device)
    with torch.no_grad():
        expected = model(x)
        assert not calls  # the torch backend never touches the fused path
        with backend.use_backend("triton"):
            out = model(x)
        assert calls  # ... and the triton backend does
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


class PlainResampler(nn.Module):
    """A resampler built on nn.MultiheadAttention (sequence-first), the released semantics; with
    ``kv_dim`` a Qwen-VL style ``kv_proj``, with ``out_dim`` MiniCPM-V style ``ln_post`` and ``proj``."""

    def __init__(self, grid, dim, heads, kv_dim=None, out_dim=None):
        super().__init__()
        if kv_dim is not None:
            self.kv_proj = nn.Linear(kv_dim, dim, bias=False)
        if out_dim is not None:
            self.ln_post = nn.LayerNorm(dim, eps=1e-6)
            self.proj = nn.Parameter(torch.randn(dim, out_dim) * dim ** -0.5)
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(dim, grid), requires_grad=False)
        self.query = nn.Parameter(torch.randn(grid * grid, dim) * 0.5)
        self.attn = nn.MultiheadAttention(dim, heads)
        self.ln_q = nn.LayerNorm(dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(dim, eps=1e-6)
        for p in (self.attn.in_proj_bias, self.attn.out_proj.bias, self.ln_q.bias, self.ln_kv.bias):
            nn.init.normal_(p, std=0.1)
        for p in (self.ln_q.weight, self.ln_kv.weight):
            nn.init.normal_(p, mean=1.0, std=0.1)

    def forward(self, x):
        if hasattr(self, "kv_proj"):
            x = self.kv_proj(x)
        x = self.ln_kv(x).permute(1, 0, 2)  # [N, B, D]
        q = (self.ln_q(self.query) + self.pos_embed).unsqueeze(1).expand(-1, x.shape[1], -1)
        k = x + key_pos_embed(self.pos_embed, x.shape[0]).unsqueeze(1)
        out = self.attn(q, k, x, need_weights=False)[0].permute(1, 0, 2)
        return self.ln_post(out) @ self.proj if hasattr(self, "proj") else out


@pytest.mark.parametrize("grid,kv_dim,out_dim", [(1, None, None), (2, None, None), (2, 48, 56)])
def test_from_module_matches_multihead_attention(grid, kv_dim, out_dim, device, monkeypatch):
    calls = count_derivations(monkeypatch)
    plain = PlainResampler(grid, 72, 4, kv_dim, out_dim).to(device).eval()
    fused_module = FusedResampler.from_module(plain)
    assert fused_module.query is plain.query and fused_module.attn is plain.attn  # shared, not copied
    assert set(fused_module.state_dict()) == set(plain.state_dict())
    x = make_x(3, 25, kv_dim or 72, torch.float32, "transposed").to(device)
    with torch.no_grad():
        expected = plain(x)
        out = fused_module(x)
    assert calls  # the fused path ran
    assert out.shape == (3, grid * grid, out_dim or 72)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_from_module_rejects_other_modules():
    with pytest.raises(ValueError, match="query"):
        FusedResampler.from_module(nn.Linear(4, 4))
    plain = PlainResampler(1, 40, 2)
    plain.attn = nn.Linear(40, 40)
    with pytest.raises(TypeError, match="attn"):
        FusedResampler.from_module(plain)


def test_gradcheck_reference_path():
    dim, heads = 8, 2
    query, pos_embed, *weights = [w.double().requires_grad_() for w in make_weights(dim, 1)]
    pos_embed.requires_grad_(False)  # a frozen table, resized to the key grid in fp32
    x = make_x(2, 4, dim, torch.float64, "contiguous").requires_grad_()
    assert torch.autograd.gradcheck(lambda x, q, *w: compress_ref(x, q, pos_embed, *w, heads, 1e-6),
                                    (x, query, *weights))


def test_gradients_through_public_function_equal_reference(device):
    weights = [w.to(device).requires_grad_() for w in make_weights(40, 2)]
    x = make_x(2, 25, 40, torch.float32, "transposed").to(device).requires_grad_()
    grad_out = torch.randn(2, 4, 40, device=device)
    fused_grads = torch.autograd.grad((compress(x, *weights, 4) * grad_out).sum(), (x, *weights))
    ref_grads = torch.autograd.grad((compress_ref(x, *weights, 4) * grad_out).sum(), (x, *weights))
    for name, got, expected in zip(("x",) + WEIGHT_NAMES, fused_grads, ref_grads):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4, msg=name)


def test_op_without_grad_formula_refuses_backward(device):
    weights = [w.to(device).requires_grad_() for w in make_weights(40, 1)]
    x = make_x(1, 9, 40, torch.float32, "contiguous").to(device)
    out = torch.ops.llava_mini.compress(x, *weights, 2, 1e-6)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        out.sum().backward()


@pytest.mark.parametrize("grid", [1, 3])
def test_opcheck(grid, device):
    weights = [w.to(device) for w in make_weights(72, grid)]
    x = make_x(2, 9, 72, torch.float32, "transposed").to(device)
    torch.library.opcheck(torch.ops.llava_mini.compress.default, (x, *weights, 4, 1e-6))


def test_opcheck_packed_sincos(device):
    weights = [w.to(device) for w in make_weights(72, 2)]
    x, cu_seqlens = ragged_x([(2, 3), (3, 3)], 72, torch.float32, "contiguous", packed=True)
    args = (x.to(device), weights[0], None, *weights[2:], 4, 1e-6, False, "sincos", torch.tensor([[2, 3], [3, 3]]),
            cu_seqlens)
    torch.library.opcheck(torch.ops.llava_mini.compress.default, args)


def test_torch_compile_fullgraph(device):
    weights = [w.to(device) for w in make_weights(40, 1)]
    x = make_x(2, 9, 40, torch.float32, "contiguous").to(device)
    compiled = torch.compile(compress, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, *weights, 2), compress_ref(x, *weights, 2), atol=1e-5, rtol=1e-4)


def flops_of(fn, *args):
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


def test_flop_counter_sees_the_op(device):
    batch, n, dim, heads, grid = 2, 25, 72, 4, 9  # projected form: the reference minus the cached q projection
    weights = [w.to(device) for w in make_weights(dim, grid)]
    x = make_x(batch, n, dim, torch.float32, "contiguous").to(device)
    assert choose_form(heads, grid * grid, dim) == "projected"
    q_projection = 2 * grid * grid * dim * dim
    assert flops_of(compress, x, *weights, heads) == flops_of(compress_ref, x, *weights, heads) - q_projection
    # absorbed form (C=1): far fewer FLOPs than projecting K and V
    weights = [w.to(device) for w in make_weights(dim, 1)]
    assert 10 * flops_of(compress, x, *weights, heads) < flops_of(compress_ref, x, *weights, heads)
    # a packed batch counts its T rows and its images
    packed, cu_seqlens = ragged_x([(2, 3), (4, 4)], dim, torch.float32, "contiguous", packed=True)
    counted = flops_of(lambda: compress(packed.to(device), *weights, heads, key_pos="none", cu_seqlens=cu_seqlens))
    assert counted == compress_flops(2, 0, dim, 1, heads, "absorbed", rows=22)


def bad(index, value):
    def edit(args):
        args = list(args)
        args[index] = value(args[index]) if callable(value) else value
        return args
    return edit


@pytest.mark.parametrize("edit,error,match", [
    (bad(0, lambda x: x[0]), ValueError, r"x: expected shape \[B, N, D\]"),
    (bad(0, lambda x: x[:, :8]), ValueError, "x: expected a square number"),
    (bad(0, lambda x: x.to(torch.int32)), TypeError, "x: expected float16, bfloat16, float32 or float64"),
    (bad(0, [[1.0]]), TypeError, "x: expected a torch.Tensor"),
    (bad(1, lambda q: q[:, :20]), ValueError, r"query: expected shape \[Q, 40\]"),
    (bad(1, lambda q: torch.zeros(2, 40)), ValueError, r"pos_embed: expected shape \[2, 40\]"),
    (bad(2, lambda p: torch.zeros(2, 40)), ValueError, "pos_embed: expected a square number"),
    (bad(3, lambda w: w[:, :20]), ValueError, r"in_proj_weight: expected shape \[120, 40\]"),
    (bad(8, lambda w: w.to("meta")), ValueError, "ln_q_bias: expected a tensor on cpu"),
    (bad(10, lambda w: w.to(torch.int64)), TypeError, "ln_kv_bias: expected a floating-point"),
    (bad(11, 3), ValueError, "num_heads: expected a positive divisor of D=40"),
])
def test_bad_inputs_raise_clear_errors(edit, error, match):
    args = [make_x(1, 9, 40, torch.float32, "contiguous"), *make_weights(40, 1), 2]
    with pytest.raises(error, match=match):
        compress(*edit(args))


def test_bad_out_and_form_raise_clear_errors():
    args = [make_x(1, 9, 40, torch.float32, "contiguous"), *make_weights(40, 1), 2]
    with pytest.raises(ValueError, match="out: expected a contiguous"):
        compress_triton(*args, out=torch.empty(1, 1, 40, dtype=torch.float16))
    with pytest.raises(ValueError, match="form: expected"):
        compress_triton(*args, form="flash")


# --- GPU only -------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("grid", [1, 2, 8])
@pytest.mark.parametrize("batch", [1, 4096])
def test_gpu_bf16_llava_mini_shapes(batch, grid, device):
    n, dim, heads = 576, 1024, 8
    weights = [w.to(device) for w in make_weights(dim, grid)]
    x = make_x(batch, n, dim, torch.bfloat16, "contiguous").to(device)
    out = torch.full((batch, grid * grid, dim), math.nan, dtype=torch.bfloat16, device=device)
    with torch.no_grad():
        compress_triton(x, *weights, heads, 1e-6, out=out)
        picked = slice(0, None, max(1, batch // 8))  # the fp64 reference on a sample of the images
        assert_close_to_fp64(out[picked], x[picked], weights, heads)
    assert not out.isnan().any()


@pytest.mark.gpu
@pytest.mark.parametrize("n,dim", [(2304, 1024), (729, 1152)])
def test_gpu_other_grids(n, dim, device):
    weights = [w.to(device) for w in make_weights(dim, 1)]
    x = make_x(3, n, dim, torch.bfloat16, "transposed").to(device)
    with torch.no_grad():
        assert_close_to_fp64(compress(x, *weights, 8), x, weights, 8)
