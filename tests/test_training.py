"""Training: ``LlavaMini(...)``'s loss and gradients as the released code computes them.

The reference here is written out independently of the model's own code paths: each prompt alone,
CLIP's chosen hidden state, the compressor, the projector, the pre-fusion decoder layers over
[vision ; compressed ; text] with a plain causal mask, the LLM input [text before <image> ; vision
tokens ; text after], labels expanded with -100 over the vision tokens, the LLM, and the shifted
cross-entropy summed over every prompt's kept positions and divided by their count (the released
``prepare_inputs_labels_for_multimodal`` + ``LlamaForCausalLM`` loss), in float64 with SDPA
attention (transformers' eager attention takes its softmax in float32 even in float64).
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from llava_mini.lmm import IGNORE_INDEX, IMAGE_TOKEN_INDEX as IMG
from llava_mini.lmm import LlavaMini, Savings

# float32 model against the float64 restatement: relative to the largest value of the compared
# tensor (the loss, or each parameter's gradient). float32 rounding through ~10 layers measures
# around 1e-6; 1e-4 leaves room without hiding a wrong term (those are O(1)).
FP32_RTOL = 1e-4
# triton (interpreter, float32) against torch (float32): both float32, different summation order.
TRITON_RTOL = 1e-4


def model_of(preset="tiny", seed=0, **overrides):
    torch.manual_seed(seed)
    return LlavaMini.from_preset(preset, dtype=torch.float32, **overrides).train()


def pixels(model, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    s, r = model.config.crop_size, model.config.resolution_ratio
    shape = (n, 3, s, s) if r == 1 else (n, r * r + 1, 3, s, s)
    return torch.randn(shape, generator=g)


PROMPTS = [[1, 5, IMG, 7, 8, 9], [1, IMG, 9, 10, 11, 12, 13, 14]]
LABELS = [[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 7, 8, 9], [IGNORE_INDEX, IGNORE_INDEX, 9, 10, 11, 12, 13, 14]]


# --- the float64 restatement ---------------------------------------------------------------------
def vision_tokens(ref, pix):
    """One image (or frame) [3, S, S] / HD [r*r+1, 3, S, S] -> (projected vision rows, projected compressed rows)."""
    cfg = ref.config
    r = cfg.resolution_ratio
    crops = pix[None] if r == 1 else pix
    feats = ref.vision_tower(crops, output_hidden_states=True).hidden_states[cfg.vision_feature_layer][:, 1:]
    if r == 1:
        return ref.mm_projector(feats[0]), ref.mm_projector(ref.compressor(feats)[0])
    g = cfg.grid
    tiled = feats[:r * r].reshape(r, r, g, g, -1).permute(0, 2, 1, 3, 4).reshape(r * g * r * g, -1)
    vision = torch.cat([ref.mm_projector(tiled), ref.mm_projector(feats[-1])])
    return vision, ref.mm_projector(ref.compressor(tiled[None])[0])


def prefuse(ref, vision, compressed, ids):
    """The released pre-fusion of one prompt: all layers over [vision ; compressed ; text], causal."""
    ids = torch.tensor(ids)
    text = ref.llm.get_input_embeddings()(ids.clamp(min=0))
    x = torch.cat([vision, compressed, text])[None]
    n = x.shape[1]
    # ids <= 0 (the placeholder) are padding to pre-fusion, as released: no key, no position
    valid = torch.cat([torch.ones(n - len(ids), dtype=torch.bool), ids > 0])
    pos = (valid.long().cumsum(0) - 1).masked_fill(~valid, 1)[None]
    mask = (torch.ones(n, n, dtype=torch.bool).tril() & valid[None, :])[None, None]
    emb = ref.prefusion.rotary_emb(x, pos)
    for layer in ref.prefusion.layers:
        x = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=emb)
    c = compressed.shape[0]
    fused_text = x[0, -len(ids):]
    return x[0, -len(ids) - c:-len(ids)], torch.where((ids > 0)[:, None], fused_text, text)


def restated_loss(ref, ids_rows, label_rows, images=None, videos=None, limit=None):
    """Summed shifted cross-entropy over every prompt's kept positions / their count."""
    total, count = 0.0, 0
    for i, (ids, labels) in enumerate(zip(ids_rows, label_rows)):
        p = ids.index(IMG)
        if videos is not None:
            parts = [prefuse(ref, *vision_tokens(ref, frame), ids) for frame in videos[i]]
            tokens = torch.cat([c for c, _ in parts])
            text = torch.stack([t for _, t in parts]).mean(0)
        else:
            tokens, text = prefuse(ref, *vision_tokens(ref, images[i]), ids)
        seq = torch.cat([text[:p], tokens, text[p + 1:]])
        lab = torch.tensor(labels[:p] + [IGNORE_INDEX] * tokens.shape[0] + labels[p + 1:])
        if limit is not None:
            seq, lab = seq[:limit], lab[:limit]
        logits = ref.llm(inputs_embeds=seq[None], use_cache=False).logits[0]
        kept = lab[1:] != IGNORE_INDEX
        total = total + F.cross_entropy(logits[:-1][kept], lab[1:][kept], reduction="sum")
        count += int(kept.sum())
    return total / count


def float64_copy(model):
    ref = copy.deepcopy(model).double()
    for config in (ref.llm.config, ref.vision_tower.config):
        config._attn_implementation = "sdpa"
    return ref


def close(got, want, rtol):
    # the floor: gradients that are zero in exact arithmetic (CLIP's key bias: softmax ignores a
    # constant shift) come out as float32 rounding (~1e-10); real gradients here are >= 1e-3
    scale = want.abs().max().clamp(min=1e-5)
    return float((got.double() - want).abs().max() / scale) <= rtol


def check_against_restatement(model, ref_args, **inputs):
    ref = float64_copy(model)
    loss = model(**inputs).loss
    loss.backward()
    want = restated_loss(ref, **ref_args)
    want.backward()
    assert close(loss.detach(), want.detach(), FP32_RTOL), (float(loss.detach()), float(want.detach()))
    grads = dict(ref.named_parameters())
    checked = 0
    for name, p in model.named_parameters():
        q = grads[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
            assert close(p.grad, q.grad, FP32_RTOL), (name, float((p.grad.double() - q.grad).abs().max()))
            checked += 1
    assert checked > 0.7 * len(grads)  # all but CLIP's unused last layer and post-layernorm
    return loss


@pytest.mark.parametrize("savings", [dict(), dict(prefix_split=False, prune_last_layer=False)], ids=["savings", "released"])
def test_image_batch_loss_and_gradients_equal_the_float64_restatement(savings):
    model = model_of()
    model.savings = Savings(**savings)
    pix = pixels(model, 2)
    check_against_restatement(model, dict(ids_rows=PROMPTS, label_rows=LABELS, images=pix.double()),
                              images=pix, input_ids=PROMPTS, labels=LABELS)


def test_padded_tensor_batch_with_attention_mask():
    model = model_of()
    pix = pixels(model, 2)
    longest = max(map(len, PROMPTS))
    ids = torch.zeros(2, longest, dtype=torch.long)
    labels = torch.full((2, longest), 3)  # padding labels must be dropped with the padding
    mask = torch.zeros(2, longest, dtype=torch.long)
    for i, (row, lab) in enumerate(zip(PROMPTS, LABELS)):
        ids[i, :len(row)], labels[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), torch.tensor(lab), 1
    check_against_restatement(model, dict(ids_rows=PROMPTS, label_rows=LABELS, images=pix.double()),
                              images=pix, input_ids=ids, labels=labels, attention_mask=mask)


def test_hd_loss_and_gradients_equal_the_float64_restatement():
    model = model_of("tiny-hd")
    pix = pixels(model, 2)
    check_against_restatement(model, dict(ids_rows=PROMPTS, label_rows=LABELS, images=pix.double()),
                              images=pix, input_ids=PROMPTS, labels=LABELS)


def test_video_loss_and_gradients_equal_the_float64_restatement():
    model = model_of()
    clips = [pixels(model, 3, seed=2), pixels(model, 2, seed=3)]
    check_against_restatement(model, dict(ids_rows=PROMPTS, label_rows=LABELS, videos=[c.double() for c in clips]),
                              videos=clips, input_ids=PROMPTS, labels=LABELS)


def test_tokenizer_model_max_length_cuts_labels_too():
    model = model_of(tokenizer_model_max_length=5)
    pix = pixels(model, 2)
    check_against_restatement(model, dict(ids_rows=PROMPTS, label_rows=LABELS, images=pix.double(), limit=5),
                              images=pix, input_ids=PROMPTS, labels=LABELS)


def test_logits_without_labels_and_right_padding():
    model = model_of().eval()
    pix = pixels(model, 2)
    with torch.no_grad():
        out = model(images=pix, input_ids=PROMPTS)
        assert out.loss is None
        alone = model(images=pix[:1], input_ids=PROMPTS[:1]).logits
    assert out.logits.shape[:2] == (2, 8)  # L - 1 + C^2 for the longer prompt, right-padded
    torch.testing.assert_close(out.logits[:1, :6], alone, rtol=0, atol=2e-5)


def test_bad_labels_are_refused():
    model = model_of()
    pix = pixels(model, 2)
    with pytest.raises(ValueError, match="labels"):
        model(images=pix, input_ids=PROMPTS, labels=[LABELS[0]])
    with pytest.raises(ValueError, match="labels"):
        model(images=pix, input_ids=PROMPTS, labels=[LABELS[0], LABELS[1][:-1]])
    with pytest.raises(ValueError, match="labels"):
        model(images=pix, input_ids=torch.tensor([[1, IMG, 4, 5]] * 2), labels=torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids"):
        model(images=pix, labels=LABELS)


def test_all_ignored_labels_give_nan_as_released():
    # transformers' (and the released 4.43's) mean cross-entropy over no kept position is 0 / 0
    model = model_of()
    loss = model(images=pixels(model, 2), input_ids=PROMPTS, labels=[[IGNORE_INDEX] * len(r) for r in PROMPTS]).loss
    assert torch.isnan(loss)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = model_of()
        if checkpointing:
            model.gradient_checkpointing_enable()
        calls = []
        for layer in model.prefusion.layers:  # the pre-fusion layers really are recomputed
            layer.register_forward_pre_hook(lambda *args: calls.append(1))
        model(images=pixels(model, 2), input_ids=PROMPTS, labels=LABELS).loss.backward()
        # prefix (pruned last layer: one call each) + text, each recomputed once in the backward
        assert len(calls) == (2 if checkpointing else 1) * 2 * len(model.prefusion.layers)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("preset", ["tiny", "tiny-hd"])
def test_triton_backend_equals_torch_backend(preset):
    grads, losses = [], []
    for name in ("torch", "triton"):
        model = model_of(preset).set_backend(name)
        pix = pixels(model, 2)
        loss = model(images=pix, input_ids=PROMPTS, labels=LABELS).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert close(losses[1], losses[0].double(), TRITON_RTOL)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert close(grads[1][name], grads[0][name].double(), TRITON_RTOL), name
