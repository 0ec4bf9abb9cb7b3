"""The compressor (Resampler) against the released nn.MultiheadAttention semantics, in fp64."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llava_mini.kernels.compress.ref import key_pos_embed, sincos_pos_embed_2d
from llava_mini.lmm.compressor import Resampler

RELEASED_KEYS = {"query", "pos_embed", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
                 "attn.out_proj.bias", "ln_q.weight", "ln_q.bias", "ln_kv.weight", "ln_kv.bias"}


def mae_sincos(dim, grid):
    """MAE's numpy 2-D sin-cos table, as the released code builds it."""
    def one_d(d, pos):
        omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    g = np.stack(np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64)), axis=0)
    return np.concatenate([one_d(dim // 2, g[0]), one_d(dim // 2, g[1])], axis=1)


class ReleasedResampler(nn.Module):
    """The released forward, written with nn.MultiheadAttention (the semantics to match)."""

    def __init__(self, grid, dim, heads):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(grid * grid, dim), requires_grad=False)
        self.query = nn.Parameter(torch.zeros(grid * grid, dim))
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_q = nn.LayerNorm(dim)  # PyTorch's default eps (1e-5), as the release builds it
        self.ln_kv = nn.LayerNorm(dim)

    def forward(self, x):
        side = int(math.sqrt(x.shape[1]))
        src = int(math.sqrt(self.pos_embed.shape[0]))
        pos = self.pos_embed
        if src != side:
            pos = F.interpolate(pos.float().reshape(1, src, src, -1).permute(0, 3, 1, 2), size=(side, side),
                                mode="bicubic", align_corners=False).permute(0, 2, 3, 1).flatten(0, 2).to(x.dtype)
        x = self.ln_kv(x)
        q = self.ln_q(self.query) + self.pos_embed
        out, _ = self.attn(q.unsqueeze(0).expand(x.shape[0], -1, -1), x + pos.unsqueeze(0), x)
        return out


def randomize(module):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn_like(p) * (0.2 if "weight" in name else 0.1) + (1.0 if name.startswith("ln") and name.endswith("weight") else 0.0))


@pytest.mark.parametrize("grid", [1, 2, 8])
@pytest.mark.parametrize("n", [576, 2304, 36])
def test_resampler_matches_released_semantics(grid, n):
    torch.manual_seed(grid * 1000 + n)
    ours = Resampler(grid, 64, 8).double()
    randomize(ours)
    released = ReleasedResampler(grid, 64, 8).double()
    released.load_state_dict(ours.state_dict())
    x = torch.randn(2, n, 64, dtype=torch.float64)
    out = ours(x)
    assert out.shape == (2, grid * grid, 64)
    torch.testing.assert_close(out, released(x), rtol=1e-10, atol=1e-10)


def test_layernorm_eps_is_pytorchs_default():
    resampler = Resampler(1, 32, 4)
    assert resampler.ln_q.eps == resampler.ln_kv.eps == nn.LayerNorm(32).eps == 1e-5


def test_state_dict_keys_are_the_released_ones():
    assert set(Resampler(1, 32, 4).state_dict()) == RELEASED_KEYS


@pytest.mark.parametrize("dim,grid", [(64, 1), (64, 3), (1024, 8)])
def test_sincos_table_matches_mae_definition(dim, grid):
    table = sincos_pos_embed_2d(dim, grid)
    assert table.dtype == torch.float32 and table.shape == (grid * grid, dim)
    np.testing.assert_allclose(table.double().numpy(), mae_sincos(dim, grid), atol=1e-6)


def test_key_table_is_the_bicubic_resize_of_the_query_table():
    table = sincos_pos_embed_2d(64, 2)
    resized = key_pos_embed(table, 36)
    grid = table.reshape(1, 2, 2, 64).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(36, 64)
    torch.testing.assert_close(resized, want)
    assert key_pos_embed(table, 4) is table  # same grid: no resize
    # a constant table stays constant under bicubic resizing (a check independent of F.interpolate)
    const = torch.ones(4, 8)
    torch.testing.assert_close(key_pos_embed(const, 49), torch.ones(49, 8))


def test_non_square_token_count_is_a_clear_error():
    with pytest.raises(ValueError, match="square"):
        Resampler(1, 32, 4)(torch.randn(1, 35, 32))


def test_wrong_input_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"x: expected shape \[B, N, 32\]"):
        Resampler(1, 32, 4)(torch.randn(1, 36, 16))
