"""Inputs: image kinds, CLIP preprocessing, video files, text prompts, and clear errors for bad input."""

import numpy as np
import pytest
import torch
from PIL import Image

from llava_mini.lmm import IMAGE_TOKEN_INDEX as IMG
from llava_mini.lmm import LlavaMini, LlavaMiniConfig
from llava_mini.lmm import processing, video


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LlavaMini.from_preset("tiny")


PROCESSOR = processing.clip_image_processor(28)


def test_pil_numpy_tensor_and_path_give_the_same_pixels(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    forms = [Image.fromarray(rgb), rgb, torch.from_numpy(rgb).permute(2, 0, 1), tmp_path / "a.png",
             str(tmp_path / "a.png"), torch.from_numpy(rgb).permute(2, 0, 1).float() / 255]
    pixels = [processing.preprocess_image(f, PROCESSOR) for f in forms]
    for p in pixels[1:]:
        torch.testing.assert_close(p, pixels[0], atol=0, rtol=0)
    assert pixels[0].shape == (3, 28, 28)


def test_processor_is_clip_l_336_at_the_crop_size_or_the_checkpoints(tmp_path):
    assert PROCESSOR.crop_size == {"height": 28, "width": 28} and PROCESSOR.size == {"shortest_edge": 28}
    assert tuple(PROCESSOR.image_mean) == processing.CLIP_MEAN and PROCESSOR.resample == Image.BICUBIC
    custom = processing.clip_image_processor(28)
    custom.image_mean = [0.5, 0.5, 0.5]
    custom.save_pretrained(str(tmp_path))
    assert list(processing.clip_image_processor(28, tmp_path).image_mean) == [0.5, 0.5, 0.5]
    assert tuple(processing.clip_image_processor(28, tmp_path / "elsewhere").image_mean) == processing.CLIP_MEAN


def test_pad_centres_the_image_on_a_square_of_the_mean_colour():
    image = Image.new("RGB", (40, 20), (255, 255, 255))
    padded = np.asarray(processing.pad_to_square(image, processing.mean_fill(PROCESSOR)))
    assert padded.shape == (40, 40, 3)
    fill = [int(m * 255) for m in processing.CLIP_MEAN]  # truncated, as released: (122, 116, 104)
    assert (padded[:10] == fill).all() and (padded[30:] == fill).all() and (padded[10:30] == 255).all()
    # through the processor, the padding band normalises to about zero, the image to (1 - mean) / std
    pixels = processing.preprocess_image(image, PROCESSOR, pad=True)
    assert pixels[:, :5].abs().max() < 0.02 and (pixels[:, 10:18] > 1.5).all()
    assert (processing.preprocess_image(image, PROCESSOR, pad=False) > 1.5).all()  # no pad: all image


def test_hd_splits_the_original_image_into_blocks_then_the_whole():
    rgb = np.random.default_rng(1).integers(0, 256, (41, 57, 3), dtype=np.uint8)
    blocks = processing.split_image(Image.fromarray(rgb), 2)
    assert [b.size for b in blocks] == [(28, 20)] * 4 + [(57, 41)]
    np.testing.assert_array_equal(np.asarray(blocks[1]), rgb[:20, 28:56])  # top-right, row-major
    np.testing.assert_array_equal(np.asarray(blocks[2]), rgb[20:40, :28])  # bottom-left
    pixels = processing.preprocess_image(rgb, PROCESSOR, resolution_ratio=2, pad=False)
    assert pixels.shape == (5, 3, 28, 28)
    torch.testing.assert_close(pixels[1], processing.preprocess_image(blocks[1], PROCESSOR, pad=False), atol=0, rtol=0)


def test_video_frames_are_resized_nearest_without_pad_and_split_for_hd():
    frame = np.zeros((28, 56, 3), dtype=np.uint8)
    frame[:, 28:] = 255  # left half black, right half white: squeezed, not padded or cropped
    pixels = processing.preprocess_video_frames(iter([frame, frame]), PROCESSOR)
    assert pixels.shape == (2, 3, 28, 28)
    black, white = pixels[0, :, :, :13], pixels[0, :, :, 15:]
    assert (black < -1.4).all() and (white > 1.5).all()
    # first resized (nearest) to the released fixed 336 x 336, then through the processor as an image
    big = np.repeat(np.repeat(frame, 12, axis=0), 6, axis=1)  # nearest 28 x 56 -> 336 x 336
    torch.testing.assert_close(pixels[0], processing.preprocess_image(big, PROCESSOR, pad=False), atol=0, rtol=0)
    hd = processing.preprocess_video_frames([frame], PROCESSOR, resolution_ratio=2)
    assert hd.shape == (1, 5, 3, 28, 28)
    assert (hd[0, 0] < -1.4).all() and (hd[0, 1] > 1.5).all()  # top-left block black, top-right white
    torch.testing.assert_close(hd[0, 4], pixels[0], atol=0, rtol=0)  # the whole frame last
    with pytest.raises(ValueError, match="video: expected at least one frame"):
        processing.preprocess_video_frames([], PROCESSOR)


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
    frames = video.decode_video(tmp_path / "v.mp4", fps=1.0)
    assert len(frames) == 4
    brightness = [f.mean() for f in frames]
    assert brightness == sorted(brightness)  # in time order, one per second
    assert len(video.decode_video(tmp_path / "v.mp4", fps=2.0)) == 8
    assert len(video.decode_video(tmp_path / "v.mp4", fps=2.0, max_frames=3)) == 3
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


@pytest.mark.parametrize("has_pyav", [True, False])
def test_missing_video_file(model, tmp_path, monkeypatch, has_pyav):
    """A wrong path is reported as such, also where PyAV is not installed (found on the GPU machine)."""
    if not has_pyav:
        def no_pyav():
            raise ImportError("decoding video files needs PyAV")
        monkeypatch.setattr(video, "import_av", no_pyav)
    with pytest.raises(ValueError, match="video: no such file"):
        model.encode(videos=[tmp_path / "none.mp4"], input_ids=[[1, IMG, 5]])


@pytest.mark.parametrize("bad", [torch.rand(28, 28), torch.rand(1, 3, 28), torch.rand(4, 28, 28)])
def test_wrong_image_tensor_shape(model, bad):
    with pytest.raises(ValueError, match=r"images\[0\]: expected a tensor \[3, H, W\]"):
        model.encode([bad], [[1, IMG, 5]])


def test_wrong_pixel_batch_shape(model):
    with pytest.raises(ValueError, match=r"images: expected pixel values \[B > 0, 3, 28, 28\]"):
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
    with pytest.raises(ValueError, match="image_aspect_ratio: expected one of"):
        LlavaMiniConfig.from_preset("tiny", image_aspect_ratio="anyres")
    with pytest.raises(ValueError, match="tokenizer_model_max_length: expected a positive int or None"):
        LlavaMiniConfig.from_preset("tiny", tokenizer_model_max_length=0)
