"""Inputs: image kinds, CLIP preprocessing, video files, text prompts, and clear errors for bad input."""

import numpy as np
import pytest
import torch
from PIL import Image

from llava_mini.lmm import IMAGE_TOKEN_INDEX as IMG
from llava_mini.lmm import LlavaMini, LlavaMiniConfig
from llava_mini.lmm import processing


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LlavaMini.from_preset("tiny")


def test_pil_numpy_tensor_and_path_give_the_same_pixels(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    forms = [Image.fromarray(rgb), rgb, torch.from_numpy(rgb).permute(2, 0, 1), tmp_path / "a.png",
             str(tmp_path / "a.png")]
    pixels = [processing.preprocess_image(f, 28) for f in forms]
    for p in pixels[1:]:
        torch.testing.assert_close(p, pixels[0])
    assert pixels[0].shape == (3, 28, 28)


def test_clip_geometry_resizes_shortest_side_and_center_crops():
    image = torch.zeros(3, 20, 40)
    image[:, :, 15:25] = 1.0  # a white band in the middle quarter
    out = processing.resize_center_crop(image, 10)
    assert out.shape == (3, 10, 10)
    # 20x40 -> 10x20, cropped to the middle 10 columns: the band lands on columns 2.5..7.5
    assert out[:, :, 4:6].min() > 0.9 and out[:, :, 0].max() < 0.1 and out[:, :, 9].max() < 0.1
    normalized = processing.normalize(torch.ones(3, 1, 1))
    torch.testing.assert_close(normalized.flatten(), (1 - torch.tensor(processing.CLIP_MEAN)) / torch.tensor(processing.CLIP_STD))


def test_hd_pixels_are_four_crops_then_the_global_view():
    image = torch.rand(3, 56, 56)
    pixels = processing.preprocess_image(image, 28, resolution_ratio=2)
    assert pixels.shape == (5, 3, 28, 28)
    torch.testing.assert_close(pixels[1], processing.normalize(image[:, :28, 28:]))  # top-right crop
    torch.testing.assert_close(pixels[2], processing.normalize(image[:, 28:, :28]))  # bottom-left crop


def write_video(path, seconds=4, rate=10, size=32):
    av = pytest.importorskip("av")
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("mpeg4", rate=rate)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(seconds * rate):
            frame = np.full((size, size, 3), (i * 6) % 256, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def test_video_file_is_sampled_at_the_requested_rate(tmp_path, model):
    write_video(tmp_path / "v.mp4")
    frames = processing.decode_video(tmp_path / "v.mp4", fps=1.0)
    assert len(frames) == 4
    brightness = [f.mean() for f in frames]
    assert brightness == sorted(brightness)  # in time order, one per second
    assert len(processing.decode_video(tmp_path / "v.mp4", fps=2.0)) == 8
    assert len(processing.decode_video(tmp_path / "v.mp4", fps=2.0, max_frames=3)) == 3
    out = model.encode(videos=[tmp_path / "v.mp4"], input_ids=[[1, IMG, 5]])
    assert out.inputs_embeds.shape[1] == 2 + 4  # L - 1 + T * C^2


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<image>"] + "a chat between curious human and an artificial intelligence " \
        "assistant the gives helpful detailed polite answers to human's questions user: what is in picture ? " \
        "assistant: . ,".split()
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_text_prompts_use_the_template_and_the_image_placeholder(model, tmp_path):
    model.tokenizer = tiny_tokenizer()
    try:
        ids = model.prompt_ids(prompts="what is in the picture ?")[0]
        assert ids[0] == model.tokenizer.bos_token_id and ids.count(IMG) == 1
        text = processing.apply_template("what is in the picture ?", "vicuna_v1")
        assert text.startswith(processing.VICUNA_SYSTEM) and "USER: <image>\nwhat" in text and text.endswith("ASSISTANT:")
        tokens = model.generate([torch.rand(3, 28, 28)], prompts=["what is in the picture ?"], max_new_tokens=3)
        assert len(model.decode(tokens)) == 1
        model.save_pretrained(tmp_path / "ckpt")
        loaded = LlavaMini.from_pretrained(tmp_path / "ckpt")
        assert loaded.prompt_ids(prompts="what is in the picture ?")[0] == ids
    finally:
        model.tokenizer = None


def test_llama3_template_shape():
    text = processing.apply_template("hi", "llama_3_1")
    assert text.startswith("<|start_header_id|>system") and "<|start_header_id|>user<|end_header_id|>\n\n<image>\nhi" in text


# --- bad input -------------------------------------------------------------------------------------
def test_unreadable_image_file(tmp_path, model):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=r"images\[0\]: cannot read an image"):
        model.encode([bad], [[1, IMG, 5]])


def test_empty_video(model):
    with pytest.raises(ValueError, match="video: expected at least one frame"):
        model.encode(videos=[[]], input_ids=[[1, IMG, 5]])


def test_missing_video_file(model, tmp_path):
    with pytest.raises(ValueError, match="video: no such file"):
        model.encode(videos=[tmp_path / "none.mp4"], input_ids=[[1, IMG, 5]])


@pytest.mark.parametrize("bad", [torch.rand(28, 28), torch.rand(1, 3, 28), torch.rand(4, 28, 28)])
def test_wrong_image_tensor_shape(model, bad):
    with pytest.raises(ValueError, match=r"images\[0\]: expected a tensor \[3, H, W\]"):
        model.encode([bad], [[1, IMG, 5]])


def test_wrong_pixel_batch_shape(model):
    with pytest.raises(ValueError, match=r"images: expected pixel values \[B, 3, 28, 28\]"):
        model.embed_vision(torch.rand(2, 3, 27, 27))


def test_wrong_image_type(model):
    with pytest.raises(TypeError, match=r"images\[0\]: expected a PIL image"):
        model.encode([3.5], [[1, IMG, 5]])


def test_unknown_preset():
    with pytest.raises(ValueError, match="preset: unknown preset 'llava-9000'"):
        LlavaMiniConfig.from_preset("llava-9000")


def test_prompt_without_placeholder_and_mismatched_counts(model):
    with pytest.raises(ValueError, match=r"input_ids\[0\]: expected exactly one image placeholder"):
        model.encode([torch.rand(3, 28, 28)], [[1, 5, 6]])
    with pytest.raises(ValueError, match="images: 3 given for 2 prompts"):
        model.encode([torch.rand(3, 28, 28)] * 3, [[1, IMG], [1, IMG, 4]])
    with pytest.raises(ValueError, match="prompts: text prompts need a tokenizer"):
        model.encode([torch.rand(3, 28, 28)], prompts="hello")


def test_bad_config_values():
    with pytest.raises(ValueError, match="compressor_size"):
        LlavaMiniConfig.from_preset("tiny", compressor_size=0)
    with pytest.raises(ValueError, match="prefusion_layers"):
        LlavaMiniConfig.from_preset("tiny", prefusion_layers=-1)
