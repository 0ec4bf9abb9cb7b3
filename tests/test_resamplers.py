"""FusedResampler as a drop-in for the resamplers VLMs ship, against their real outputs (issue 15).

tests/data/resamplers/*.pt hold outputs of the real resampler code of Qwen-VL, OmniLMM and
MiniCPM-V 2.0 / 2.5 / 2.6 (float64, tiny widths; see the README there). Their code is not in this
repository, so each test builds its plain-PyTorch equivalent (``compress.released``: the same
attribute names and forward signature), loads the fixture's weights into it, converts it with
``FusedResampler.from_module`` and compares the result with the real module's output: the reference
path in fp64 (< 1e-9 relative) and the Triton kernel (interpreter) in fp32 (< 1e-4), both forms.
"""

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from llava_mini.kernels.compress import FusedResampler, compress_ref, compress_triton, key_pos_embed
from llava_mini.kernels.compress import triton as fused_triton
from llava_mini.kernels.compress.released import MiniCPMV20Resampler, MiniCPMV26Resampler, QwenVLResampler

DATA = Path(__file__).parent / "data" / "resamplers"
FIXTURES = ["qwen_vl", "omnilmm", "minicpmv20_adaptive_true", "minicpmv20_adaptive_false", "minicpmv25", "minicpmv26"]


STAND_INS = {"qwen_vl": QwenVLResampler, "omnilmm": QwenVLResampler, "minicpmv20": MiniCPMV20Resampler,
             "minicpmv26": MiniCPMV26Resampler}


def load(name):
    return torch.load(DATA / f"{name}.pt", weights_only=True)


def stand_in(record, dtype=torch.float64):
    config = dict(record["config"])
    module = STAND_INS[config.pop("variant")](**config).double()  # fp64 before loading: no rounding
    module.load_state_dict(record["state_dict"])
    return module.to(dtype).eval()


def in_dtype(args, dtype):
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in args.items()}


def relative_error(out, expected):
    return ((out.double() - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("name", FIXTURES)
def test_reference_path_matches_the_real_module_fp64(name):
    record = load(name)
    fused = FusedResampler.from_module(stand_in(record))
    for call in record["calls"]:
        out = fused(**call["args"])  # float64 runs the reference path
        assert out.dtype == torch.float64 and out.shape == call["output"].shape
        assert relative_error(out, call["output"]) < 1e-9


@pytest.fixture
def record_forms(monkeypatch):
    """Which kernel form ran (and force one); internal buffers start as NaN so unwritten parts show."""
    ran = []
    for form, function in (("absorbed", "_absorbed_heads"), ("projected", "projected_heads")):
        original = getattr(fused_triton, function)
        monkeypatch.setattr(fused_triton, function,
                            lambda *a, _f=original, _n=form, **k: (ran.append(_n), _f(*a, **k))[1])
    monkeypatch.setattr(fused_triton, "_empty", lambda shape, dtype, device: torch.full(shape, math.nan, dtype=dtype,
                                                                                         device=device))
    return ran


@pytest.mark.parametrize("form", ["absorbed", "projected"])
@pytest.mark.parametrize("name", FIXTURES)
def test_fused_kernel_matches_the_real_module_fp32(name, form, record_forms, monkeypatch):
    monkeypatch.setattr(fused_triton, "choose_form", lambda *args: form)
    record = load(name)
    fused = FusedResampler.from_module(stand_in(record, torch.float32))
    with torch.no_grad():
        for call in record["calls"]:
            out = fused(**in_dtype(call["args"], torch.float32))
            assert out.dtype == torch.float32 and not out.isnan().any()
            assert relative_error(out, call["output"]) < 1e-4
    assert record_forms == [form] * len(record["calls"])


@pytest.mark.parametrize("name", ["minicpmv25", "minicpmv26"])
def test_packed_batch_of_different_sizes_matches_the_real_module(name, record_forms):
    record = load(name)
    call = record["calls"][0]
    x, tgt_sizes = call["args"]["x"], call["args"]["tgt_sizes"]
    packed = torch.cat([x[b, :h * w] for b, (h, w) in enumerate(tgt_sizes.tolist())]).float()  # [sum h*w, kv]
    fused = FusedResampler.from_module(stand_in(record, torch.float32))
    with torch.no_grad():
        out = fused(packed, tgt_sizes)
    assert relative_error(out, call["output"]) < 1e-4
    assert record_forms == ["absorbed"]


def test_key_padding_mask_and_empty_blocks_and_splits(device):
    # Masked keys anywhere: a whole block of 16 rows, a whole split, single rows; the kernel against
    # the fp64 reference, one and three splits per image.
    record = load("qwen_vl")
    fused = FusedResampler.from_module(stand_in(record))
    x = record["calls"][0]["args"]["x"]
    mask = torch.zeros(3, 25, dtype=torch.bool)
    mask[0, :20] = True
    mask[1, 9:] = True
    mask[2, ::2] = True
    with torch.no_grad():
        expected = fused(x, key_padding_mask=mask)
        kv = fused.kv_proj(x).float()
    assert fused.proj is None  # Qwen-VL's resampler ends with the attention
    weights = [w.float() for w in (fused.query, fused.pos_embed, fused.attn.in_proj_weight, fused.attn.in_proj_bias,
                                   fused.attn.out_proj.weight, fused.attn.out_proj.bias, fused.ln_q.weight,
                                   fused.ln_q.bias, fused.ln_kv.weight, fused.ln_kv.bias)]
    for splits in (1, 3):
        out = compress_triton(kv.to(device), *[w.detach().to(device) for w in weights], 4, 1e-6,
                              key_padding_mask=mask.to(device), form="absorbed", splits=splits)
        assert relative_error(out.cpu(), expected) < 1e-4


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide")  # the interpreter's 0/0
def test_an_image_with_no_key_gives_nan_as_multihead_attention_does(device):
    record = load("qwen_vl")
    module = stand_in(record)
    fused = FusedResampler.from_module(stand_in(record, torch.float32))
    x = record["calls"][1]["args"]["x"]
    mask = torch.tensor([[True] * 4, [False, True, False, True]])
    with torch.no_grad():
        expected = module.attend(x, module.pos_embed[:, None], module.pos_embed, key_padding_mask=mask)
        out = fused(x.float(), key_padding_mask=mask)
    assert expected[0].isnan().all() and out[0].isnan().all()
    assert relative_error(out[1:], expected[1:]) < 1e-4


# --- refused at conversion, with a message naming what is missing or different ---------------

class UnknownForward(QwenVLResampler):
    def forward(self, x, tgt_sizes, attention_mask=None):
        return super().forward(x)


class ResizesInsteadOfSinCos(MiniCPMV20Resampler):
    """Looks like MiniCPM-V 2.0 with adaptive=True but resizes the query table for the keys."""

    def forward(self, x, tgt_size=None, attn_mask=None):
        return self.attend(x, key_pos_embed(self.pos_embed, tuple(tgt_size))[:, None], self.pos_embed,
                           attn_mask=attn_mask)


class ScaledAttention(nn.MultiheadAttention):
    """An nn.MultiheadAttention subclass whose forward computes something else (sharper scores)."""

    def forward(self, query, key, value, **kwargs):
        return super().forward(query * 2, key, value, **kwargs)


def with_weights(module, name):
    module.double().load_state_dict(load(name)["state_dict"])
    return module


def qwen_module(**changes):
    module = stand_in(load("qwen_vl"))
    for name, value in changes.items():
        setattr(module, name, value)
    return module


@pytest.mark.parametrize("build,error,match", [
    (lambda: UnknownForward(grid_size=2, embed_dim=32, num_heads=4, kv_dim=24, ln_post=False), ValueError,
     r"UnknownForward.forward\(x, tgt_sizes, attention_mask\) is not a resampler this reproduces"),
    (lambda: with_weights(ResizesInsteadOfSinCos(adaptive=True, grid_size=2, embed_dim=32, num_heads=4, kv_dim=24,
                                                 ln_post=True), "minicpmv20_adaptive_true"),
     ValueError, "computes something else than the minicpm-v-2.0 resampler"),
    (lambda: qwen_module(attn=ScaledAttention(32, 4).double()), ValueError, "computes something else"),
    (lambda: qwen_module(ln_kv=nn.Identity()), TypeError, r"module.ln_kv: expected nn.LayerNorm\(32\)"),
    (lambda: qwen_module(ln_q=nn.LayerNorm(32, eps=1e-5).double()), ValueError, "ln_q.eps .* must match"),
    (lambda: qwen_module(attn=nn.MultiheadAttention(32, 4, dropout=0.1).double()), ValueError, "dropout=0.1"),
    (lambda: qwen_module(pos_embed=nn.Parameter(torch.zeros(9, 32, dtype=torch.float64))), ValueError,
     r"module.pos_embed: expected the \[4, 32\] query position table"),
    (lambda: MiniCPMV20Resampler(adaptive=None, grid_size=2, embed_dim=32, num_heads=4, kv_dim=24, ln_post=True), TypeError,
     "module.adaptive: expected MiniCPM-V 2.0's bool"),
    (lambda: qwen_module().to("meta"), ValueError, "meta device"),
])
def test_from_module_refuses_what_it_cannot_reproduce(build, error, match):
    with pytest.raises(error, match=match):
        FusedResampler.from_module(build())


def test_from_module_refuses_a_key_cache_that_is_not_the_sincos_table():
    module = stand_in(load("minicpmv26"))
    module.pos_embed[3, 5] += 1e-3
    with pytest.raises(ValueError, match="not the 2-D sin-cos table"):
        FusedResampler.from_module(module)


@pytest.mark.parametrize("name,call,error,match", [
    ("minicpmv20_adaptive_true", lambda f, x: f(x), ValueError, r"tgt_size: MiniCPM-V 2.0's resampler needs"),
    ("minicpmv20_adaptive_true", lambda f, x: f(x, (3, 3)), ValueError, r"x: expected \[B, h\*w = 9, kv_dim\]"),
    ("minicpmv26", lambda f, x: f(x), ValueError, "tgt_sizes: MiniCPM-V 2.5/2.6's resampler needs"),
    ("qwen_vl", lambda f, x: f(x, tgt_sizes=torch.ones(1, 2)), TypeError,
     r"\(qwen-vl\) takes \(x, attn_mask, key_padding_mask\)"),
    ("qwen_vl", lambda f, x: f(x[:, :5]), ValueError, "x: expected a square number of vision tokens"),
])
def test_forward_errors_name_the_argument(name, call, error, match):
    fused = FusedResampler.from_module(stand_in(load(name)))
    x = torch.randn(1, 6, 24, dtype=torch.float64)
    with pytest.raises(error, match=match):
        call(fused, x)


def test_shared_parameters_and_state_dict_names():
    for name in FIXTURES:
        module = stand_in(load(name))
        fused = FusedResampler.from_module(module)
        assert fused.query is module.query and fused.attn is module.attn and fused.kv_proj is module.kv_proj
        assert set(fused.state_dict()) == set(module.state_dict())


def test_reference_spec_handles_packed_and_padded_alike():
    # The spec itself: a packed batch equals its padded form with grid sizes.
    record = load("minicpmv26")
    state = record["state_dict"]
    weights = [state[k] for k in ("query",)] + [None] + [state[k] for k in (
        "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias",
        "ln_q.weight", "ln_q.bias", "ln_kv.weight", "ln_kv.bias")]
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    grids = torch.tensor([[3, 4], [2, 3]])
    padded = compress_ref(x, *weights, 4, 1e-6, query_pos=False, key_pos="sincos", grid_sizes=grids)
    packed = compress_ref(torch.cat([x[0], x[1, :6]]), *weights, 4, 1e-6, query_pos=False, key_pos="sincos",
                          grid_sizes=grids, cu_seqlens=torch.tensor([0, 12, 18]))
    torch.testing.assert_close(packed, padded, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("form", ["absorbed", "projected"])
@pytest.mark.parametrize("name", FIXTURES)
def test_fused_module_trains_with_the_real_modules_gradients(name, form, monkeypatch):
    """Fine-tuning through the kernel: every parameter's gradient and the input's, fp32 fused module
    against the real module in fp64 (relative to the gradient's largest entry, < 1e-4)."""
    monkeypatch.setattr(fused_triton, "choose_form", lambda *args: form)
    record = load(name)
    call = record["calls"][0]
    real = stand_in(record).train()
    fused = FusedResampler.from_module(stand_in(record, torch.float32)).train()
    args64 = {k: v.clone().requires_grad_() if k == "x" else v for k, v in call["args"].items()}
    args32 = {k: v.clone().requires_grad_() if k == "x" else v for k, v in in_dtype(call["args"], torch.float32).items()}
    grad = torch.randn(call["output"].shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    real(**args64).backward(grad)
    fused(**args32).backward(grad.float())
    trained = {k: p for k, p in real.named_parameters() if p.requires_grad}
    assert trained.keys() == {k for k, p in fused.named_parameters() if p.requires_grad}
    for key, parameter in fused.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and not parameter.grad.isnan().any(), key
            assert relative_error(parameter.grad, trained[key].grad) < 1e-4, key
    assert relative_error(args32["x"].grad, args64["x"].grad) < 1e-4
