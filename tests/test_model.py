"""The whole tiny LLaVA-Mini: image, HD and video paths, batching, generation, pre-fusion semantics."""

import pytest
import torch

from llava_mini.lmm import IMAGE_TOKEN_INDEX as IMG
from llava_mini.lmm import LlavaMini, Savings

ATOL = 2e-5


def model_of(preset="tiny", seed=0, **savings):
    torch.manual_seed(seed)
    model = LlavaMini.from_preset(preset, dtype=torch.float32)
    model.savings = Savings(**savings)
    return model


def reference_savings():
    return dict(prefix_split=False, prune_last_layer=False, batch_frames=False)


def images(n, size=28, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, size + 3 * i, size + 5 * i, generator=g) for i in range(n)]


PROMPTS = [[1, 5, IMG, 7, 8], [1, IMG, 9, 10, 11, 12, 13, 14]]


def test_image_path_gives_one_token_per_image():
    model = model_of()
    out = model.encode(images(2), PROMPTS)
    assert out.inputs_embeds.shape == (2, 8, 64)  # L - 1 + C^2 for the longer prompt
    assert out.attention_mask.sum(-1).tolist() == [5, 8]
    assert torch.isfinite(out.inputs_embeds).all()


def test_hd_path_compresses_tiled_crops():
    model = model_of("tiny-hd")
    seen = {}
    model.compressor.register_forward_hook(lambda m, args, out: seen.update(n=args[0].shape[1]))
    out = model.encode(images(1, size=56), [PROMPTS[0]])
    assert seen["n"] == 4 * model.config.num_patches  # the 2x2 crops tiled into one map
    assert out.inputs_embeds.shape == (1, 4 + 4, 64)  # L - 1 + C^2 with C = 2


def test_video_path_concatenates_frame_tokens():
    model = model_of()
    frames = images(3)
    out = model.encode(videos=[frames], input_ids=[PROMPTS[0]])
    assert out.inputs_embeds.shape == (1, 4 + 3, 64)


def test_batch_of_two_equals_each_alone():
    model = model_of(**reference_savings())
    imgs = images(2)
    batch = model.encode(imgs, PROMPTS)
    for i in range(2):
        alone = model.encode([imgs[i]], [PROMPTS[i]])
        n = alone.inputs_embeds.shape[1]
        torch.testing.assert_close(batch.inputs_embeds[i, -n:], alone.inputs_embeds[0], atol=ATOL, rtol=0)
        assert batch.attention_mask[i, :-n].sum() == 0


# --- pre-fusion semantics ---------------------------------------------------------------------------
def test_vision_and_compressed_rows_do_not_depend_on_the_text():
    model = model_of(**reference_savings())
    vision, compressed = model.embed_vision(model.prepare_images(images(1)))
    n = vision.shape[1] + compressed.shape[1]
    outs = []
    for ids in ([1, 5, 6, 7], [1, 9, 9, 9, 9, 9, 3]):
        text, valid = model.embed_text([ids])
        x = torch.cat([vision, compressed, text], dim=1)
        full_valid = torch.cat([valid.new_ones(1, n), valid], dim=1)
        outs.append(model.prefusion.reference(x, full_valid)[:, :n])
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)


def test_padding_is_ignored_and_positions_follow_valid_tokens():
    """Inserting padding rows (ids <= 0) anywhere leaves every real row's output unchanged."""
    model = model_of()
    torch.manual_seed(5)
    x = torch.randn(1, 6, 64)
    valid = torch.ones(1, 6, dtype=torch.bool)
    plain = model.prefusion.reference(x, valid)
    padded_x = torch.cat([x[:, :3], torch.randn(1, 2, 64), x[:, 3:], torch.randn(1, 1, 64)], dim=1)
    padded_valid = torch.tensor([[1, 1, 1, 0, 0, 1, 1, 1, 0]], dtype=torch.bool)
    out = model.prefusion.reference(padded_x, padded_valid)
    torch.testing.assert_close(out[padded_valid], plain[0], atol=ATOL, rtol=0)
    # and the positions really matter: shifting them changes the result
    assert not torch.allclose(model.prefusion.reference(x[:, 1:], valid[:, 1:]), plain[:, 1:], atol=1e-3)


def test_llm_input_places_vision_tokens_at_the_image_placeholder():
    model = model_of(**reference_savings())
    with model.backend_scope():
        vision, compressed = model.embed_vision(model.prepare_images(images(1)))
        fused_vis, fused_text = model.fuse_reference(vision, compressed, [PROMPTS[0]])
    out = model.encode(images(1), [PROMPTS[0]]).inputs_embeds[0]
    torch.testing.assert_close(out, torch.cat([fused_text[0, :2], fused_vis[0], fused_text[0, 3:]]), atol=0, rtol=0)


def test_without_prefusion_layers_the_text_is_plain_embeddings():
    torch.manual_seed(0)
    model = LlavaMini.from_preset("tiny", prefusion_layers=0)
    out = model.encode(images(1), [PROMPTS[0]]).inputs_embeds[0]
    emb = model.llm.get_input_embeddings()(torch.tensor([1, 5, 7, 8]))
    torch.testing.assert_close(out[[0, 1, 3, 4]], emb, atol=0, rtol=0)


# --- the exact savings (issue: pre-fusion) -----------------------------------------------------------
@pytest.mark.parametrize("savings", [dict(prefix_split=True, prune_last_layer=False),
                                     dict(prefix_split=False, prune_last_layer=True),
                                     dict(prefix_split=True, prune_last_layer=True)])
def test_each_saving_gives_the_reference_output(savings):
    ref = model_of(**reference_savings()).encode(images(2), PROMPTS)
    out = model_of(**savings).encode(images(2), PROMPTS)
    torch.testing.assert_close(out.inputs_embeds, ref.inputs_embeds, atol=ATOL, rtol=0)


def test_prefix_cache_answers_a_second_question_over_text_only():
    model = model_of()
    imgs = images(2)
    prefix = model.prefix(images=imgs)
    calls = []
    model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    second = [[1, IMG, 21, 22], [1, 23, IMG, 24, 25, 26]]
    cached = model.encode(prefix=prefix, input_ids=second)
    assert not calls  # the vision tower did not run again
    fresh = model_of(**reference_savings()).encode(imgs, second)
    torch.testing.assert_close(cached.inputs_embeds, fresh.inputs_embeds, atol=ATOL, rtol=0)


def test_batched_video_frames_equal_the_per_frame_loop():
    frames = images(5)
    loop = model_of(**reference_savings()).encode(videos=[frames], input_ids=[PROMPTS[1]])
    model = model_of(frame_budget_bytes=1)  # chunks of one frame
    assert model.frame_chunk() == 1
    chunked = model.encode(videos=[frames], input_ids=[PROMPTS[1]])
    batched = model_of().encode(videos=[frames], input_ids=[PROMPTS[1]])
    torch.testing.assert_close(batched.inputs_embeds, loop.inputs_embeds, atol=ATOL, rtol=0)
    torch.testing.assert_close(chunked.inputs_embeds, loop.inputs_embeds, atol=ATOL, rtol=0)


def test_video_prefix_reused_for_a_second_question():
    model = model_of()
    frames = images(3)
    prefix = model.prefix(video=frames)
    assert prefix.compressed.shape[0] == 3
    want = model.encode(videos=[frames], input_ids=[PROMPTS[1]])
    # one prompt over all frames: the per-frame text rows are averaged, as encode does
    fused = model.fuse_text(prefix, [PROMPTS[1]] * 3)[1].float().mean(0)
    got = torch.cat([fused[:1], prefix.compressed.flatten(0, 1), fused[2:]])
    torch.testing.assert_close(got, want.inputs_embeds[0], atol=ATOL, rtol=0)


# --- backend switch ----------------------------------------------------------------------------------
def test_backend_switch_model_call_and_environment(monkeypatch):
    model = model_of()
    ref = model.encode(images(1), [PROMPTS[0]]).inputs_embeds
    model.set_backend("sdpa")
    torch.testing.assert_close(model.encode(images(1), [PROMPTS[0]]).inputs_embeds, ref, atol=ATOL, rtol=0)
    seen = []
    model.prefusion.layers[0].self_attn.register_forward_pre_hook(
        lambda m, a: seen.append(m.config._attn_implementation))
    model.encode(images(1), [PROMPTS[0]], backend="torch")
    assert set(seen) == {"eager"}
    seen.clear()
    model.encode(images(1), [PROMPTS[0]])
    assert set(seen) == {"sdpa"}
    assert model.llm.config._attn_implementation == "eager"  # restored after the call
    model.set_backend(None)
    monkeypatch.setenv("LLAVA_MINI_BACKEND", "sdpa")
    model.encode(images(1), [PROMPTS[0]])
    assert seen[-1] == "sdpa"
    monkeypatch.setenv("LLAVA_MINI_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="LLAVA_MINI_BACKEND"):
        model.encode(images(1), [PROMPTS[0]])


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="backend: unknown backend 'cuda'"):
        model_of().set_backend("cuda")
    with pytest.raises(ValueError, match="backend"):
        model_of().encode(images(1), [PROMPTS[0]], backend="nope")


@pytest.mark.parametrize("savings", [dict(), reference_savings()])
def test_triton_backend_equals_the_reference_path(savings):
    """Fused compressor + the Triton attention in pre-fusion and the LLM (interpreter on the CPU)."""
    model = model_of(**savings)
    imgs = images(2)
    ref = model.encode(imgs, PROMPTS, backend="torch").inputs_embeds
    torch.testing.assert_close(model.encode(imgs, PROMPTS, backend="triton").inputs_embeds, ref, atol=ATOL, rtol=0)
    assert torch.equal(model.generate(imgs, PROMPTS, max_new_tokens=4, eos_token_id=None, backend="triton"),
                       model.generate(imgs, PROMPTS, max_new_tokens=4, eos_token_id=None, backend="torch"))
    video = model.encode(videos=[imgs], input_ids=[PROMPTS[0]], backend="triton").inputs_embeds
    torch.testing.assert_close(video, model.encode(videos=[imgs], input_ids=[PROMPTS[0]]).inputs_embeds,
                               atol=ATOL, rtol=0)


# --- released semantics: id-0 rows, max length, HD video (issue: parity) ---------------------------
ALL_SAVINGS = [dict(prefix_split=p, prune_last_layer=q) for p in (False, True) for q in (False, True)]


def llm_position(ids, i, vision_tokens):
    """Where prompt token i lands in the (unpadded) LLM input: after <image>, shifted by its tokens."""
    p = ids.index(IMG)
    return i if i < p else i - 1 + vision_tokens


@pytest.mark.parametrize("savings", ALL_SAVINGS)
def test_rows_with_id_0_get_their_plain_embedding_back_on_every_path(savings):
    """Id 0 is masked in pre-fusion and its row is the plain embedding afterwards (images, batches, video)."""
    model = model_of(**savings)
    table = model.llm.get_input_embeddings().weight
    prompts = [[1, 0, IMG, 7, 0, 8], [1, IMG, 9, 0, 10, 11, 12]]
    out = model.encode(images(2), prompts)
    video = model.encode(videos=[images(3)], input_ids=[prompts[0]])
    for row, ids, count in [(out.inputs_embeds[0, -6:], prompts[0], 1), (out.inputs_embeds[1], prompts[1], 1),
                            (video.inputs_embeds[0], prompts[0], 3)]:
        for i, token in enumerate(ids):
            if token == 0:  # the average of plain rows over video frames is the plain row
                torch.testing.assert_close(row[llm_position(ids, i, count)], table[0], atol=0, rtol=0)
            elif token != IMG:  # every other text row is fused
                assert not torch.allclose(row[llm_position(ids, i, count)], table[token], atol=1e-3)


def test_tokenizer_model_max_length_cuts_the_llm_input_and_warns():
    model = model_of()
    full = model.encode(images(2), PROMPTS)
    model.config.tokenizer_model_max_length = 6
    with pytest.warns(UserWarning, match=r"tokenizer_model_max_length: the LLM input \(8 positions\) is cut"):
        cut = model.encode(images(2), PROMPTS)
    assert cut.attention_mask.sum(-1).tolist() == [5, 6]  # only the longer prompt is cut
    torch.testing.assert_close(cut.inputs_embeds[1], full.inputs_embeds[1, :6], atol=0, rtol=0)
    torch.testing.assert_close(cut.inputs_embeds[0, 1:], full.inputs_embeds[0, 3:], atol=0, rtol=0)


def test_hd_video_runs_each_frame_as_blocks_plus_the_whole():
    frames = images(3, size=40)
    loop = model_of("tiny-hd", **reference_savings()).encode(videos=[frames], input_ids=[PROMPTS[0]])
    assert loop.inputs_embeds.shape == (1, 4 + 3 * 4, 64)  # L - 1 + T * C^2 with C = 2
    model = model_of("tiny-hd")
    clip = model.prepare_video(frames)  # nothing decoded or preprocessed yet: chunks on demand
    pixels = torch.cat(list(clip.chunks(8, pipeline=False)))
    assert clip.count == 3 and pixels.shape == (3, 5, 3, 28, 28)
    batched = model.encode(videos=[frames], input_ids=[PROMPTS[0]])
    torch.testing.assert_close(batched.inputs_embeds, loop.inputs_embeds, atol=ATOL, rtol=0)
    ready = model.encode(videos=[pixels], input_ids=[PROMPTS[0]])  # ready pixel values are taken as they are
    torch.testing.assert_close(ready.inputs_embeds, batched.inputs_embeds, atol=0, rtol=0)
    chunked = model_of("tiny-hd", frame_budget_bytes=1).encode(videos=[frames], input_ids=[PROMPTS[0]])
    torch.testing.assert_close(chunked.inputs_embeds, loop.inputs_embeds, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match=r"video: a tensor must hold ready pixel values \[T > 0, 5, 3, 28, 28\]"):
        model.encode(videos=[pixels[:, 0]], input_ids=[PROMPTS[0]])


@pytest.mark.gpu
def test_builds_under_a_cuda_device_context():
    """``with torch.device("cuda")`` sends every new tensor there: the fixed sin-cos table's index tensors
    must not follow it away from the table (it failed so on the H200; the CPU shows nothing: CPU tensors
    index with meta or CPU indices alike)."""
    with torch.device("cuda"):
        model = LlavaMini.from_preset("tiny", dtype=torch.float32)
    assert model.compressor.query.device.type == "cuda"  # the context applied
