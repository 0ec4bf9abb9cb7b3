"""The kernel registered as transformers attention "llava_mini_triton" matches eager in a tiny Llama."""

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import llava_mini.kernels.hf as hf
from llava_mini.kernels.backend import attn_implementation


def _tiny_llama(attn_implementation, device):
    # A fresh config per model: _from_config records the attention implementation on the config object.
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
    return LlamaForCausalLM._from_config(config, attn_implementation=attn_implementation).to(device).eval()


def _tiny_llamas(device):
    torch.manual_seed(0)
    eager = _tiny_llama("eager", device)
    triton = _tiny_llama("llava_mini_triton", device)
    triton.load_state_dict(eager.state_dict())
    assert eager.model.layers[0].self_attn.config._attn_implementation == "eager"
    assert triton.model.layers[0].self_attn.config._attn_implementation == "llava_mini_triton"
    return eager, triton


def test_backend_names_the_registered_implementation():
    assert attn_implementation("triton") == hf.ATTN_IMPLEMENTATION_NAME


def test_prefill_and_cached_decode_match_eager(device):
    eager, triton = _tiny_llamas(device)
    ids = torch.randint(1, 128, (2, 23), generator=torch.Generator().manual_seed(1)).to(device)
    caches = {}
    with torch.no_grad():
        for name, model in (("eager", eager), ("triton", triton)):
            caches[name] = DynamicCache(config=model.config)
            out = model(ids, past_key_values=caches[name], use_cache=True)
            caches[name + "_logits"] = [out.logits]
            next_ids = out.logits[:, -1:].argmax(-1)
            for _ in range(4):  # one-token decode steps: Lq = 1 against the cached keys
                out = model(next_ids, past_key_values=caches[name], use_cache=True)
                caches[name + "_logits"].append(out.logits)
                next_ids = out.logits[:, -1:].argmax(-1)
    for got, want in zip(caches["triton_logits"], caches["eager_logits"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_left_padded_batch_matches_eager(device):
    eager, triton = _tiny_llamas(device)
    ids = torch.randint(1, 128, (2, 17), generator=torch.Generator().manual_seed(2)).to(device)
    mask = torch.ones(2, 17, dtype=torch.long, device=device)
    mask[1, :6] = 0  # the second prompt is 6 tokens shorter, padded on the left
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = {}
    with torch.no_grad():
        for name, model in (("eager", eager), ("triton", triton)):
            cache = DynamicCache(config=model.config)
            prefill = model(ids, attention_mask=mask, position_ids=position_ids, past_key_values=cache).logits
            step_ids = prefill[:, -1:].argmax(-1)
            mask_step = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype, device=device)], dim=1)
            step = model(step_ids, attention_mask=mask_step, position_ids=position_ids[:, -1:] + 1,
                         past_key_values=cache).logits
            logits[name] = (prefill, step)
    valid = mask.bool()
    torch.testing.assert_close(logits["triton"][0][valid], logits["eager"][0][valid], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits["triton"][1], logits["eager"][1], atol=1e-4, rtol=1e-4)


def test_attention_function_contract(device):
    module = torch.nn.Module()
    module.is_causal = True
    gen = torch.Generator().manual_seed(3)
    query = torch.randn(2, 4, 5, 16, generator=gen).to(device)
    key = torch.randn(2, 2, 9, 16, generator=gen).to(device)
    value = torch.randn(2, 2, 9, 16, generator=gen).to(device)
    keep = torch.ones(2, 9, dtype=torch.long, device=device)
    keep[0, :3] = 0
    out, weights = hf.llava_mini_attention_forward(module, query, key, value, keep, scaling=0.3)
    assert weights is None and out.shape == (2, 5, 4, 16)
    ref = hf.prefusion_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                 key_padding_mask=keep.bool(), scale=0.3, backend="torch")
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match="attention_mask: .* 2-D key padding mask"):
        hf.llava_mini_attention_forward(module, query, key, value, torch.zeros(2, 1, 5, 9, device=device))
    with pytest.raises(ValueError, match="dropout"):
        hf.llava_mini_attention_forward(module, query, key, value, None, dropout=0.1)


def test_mask_function_rejects_non_causal_patterns():
    from transformers.masking_utils import sliding_window_causal_mask_function

    assert hf.llava_mini_attention_mask(batch_size=1, q_length=3, kv_length=3, attention_mask=None) is None
    with pytest.raises(ValueError, match="plain causal mask"):
        hf.llava_mini_attention_mask(batch_size=1, q_length=3, kv_length=3,
                                     mask_function=sliding_window_causal_mask_function(2))
