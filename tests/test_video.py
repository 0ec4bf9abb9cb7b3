"""Videos: the released frame selection, streaming decode in bounded memory, the pipelined frame path,
bad files, long contexts (10,000 frames) and the video prefix budget."""

import threading
import weakref

import numpy as np
import pytest
import torch

from llava_mini.lmm import IMAGE_TOKEN_INDEX as IMG
from llava_mini.lmm import LlavaMini, LlavaMiniConfig, Savings
from llava_mini.lmm import video as V

pytest.importorskip("av")
PROMPT = [1, 5, IMG, 7]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LlavaMini.from_preset("tiny")


def clip(tmp_path, name="v.mp4", frames=40, **kwargs):
    return V.write_synthetic_video(tmp_path / name, frames, **kwargs)


# --- selection -------------------------------------------------------------------------------------
def test_released_selection_middles_of_equal_segments():
    # 100 frames at 25 fps: int(100 // 25) = 4 segments of 99 / 4 = 24.75 frames
    assert V.select_frames(100, 25.0) == [12, 37, 62, 86]
    # every frame asked for: the released rule repeats a frame and skips the last one
    assert V.select_frames(4, 1.0) == [0, 1, 2, 2]
    # 29.97 fps, 60 s: one frame per whole second
    assert len(V.select_frames(1798, 29.97)) == 59
    # shorter than a second: the released code selects nothing; we take the middle frame
    assert V.select_frames(10, 25.0) == [4]
    assert V.select_frames(1, 30.0) == [0]


def test_fps_and_max_frames_are_options_of_the_same_rule():
    assert V.select_frames(100, 25.0, fps=2.0) == V.select_frames(100, 12.5)
    assert V.select_frames(100, 25.0, max_frames=2) == V.select_frames(100, 50.0)
    long = V.select_frames(300_000, 30.0)  # a 2.8 hour video: the default keeps all 10,000 seconds
    assert len(long) == 10_000 and long == sorted(long) and long[-1] < 300_000


@pytest.mark.parametrize("kwargs, match", [(dict(fps=0), "fps: expected a positive"),
                                           (dict(max_frames=0), "max_frames: expected a positive"),
                                           (dict(max_frames=2.5), "max_frames: expected a positive")])
def test_selection_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        V.select_frames(100, 25.0, **kwargs)


# --- files -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, codec, frames_from", [("v.mp4", "mpeg4", "container"), ("v.mkv", "ffv1", "packets")])
def test_probe_reads_count_and_rate_without_decoding(tmp_path, name, codec, frames_from):
    info = V.probe(clip(tmp_path, name, 57, fps=12, size=(48, 32), codec=codec))
    assert (info.total_frames, info.avg_fps, info.width, info.height, info.frames_from) == (57, 12.0, 48, 32, frames_from)


def test_decoded_frames_are_the_selected_ones_in_order(tmp_path):
    path = clip(tmp_path, frames=95, fps=10)
    frames = V.decode_video(path)
    assert [V.synthetic_index(f) for f in frames] == V.select_frames(95, 10.0)  # 9 frames, one per second
    assert [V.synthetic_index(f) for f in V.decode_video(path, fps=4.0, max_frames=5)] == V.select_frames(95, 10.0, 4.0, 5)
    assert frames[0].shape == (32, 32, 3) and frames[0].dtype == np.uint8


def test_b_frames_are_selected_in_presentation_order(tmp_path):
    av = pytest.importorskip("av")
    path = clip(tmp_path, frames=60, fps=10, options={"qmax": "2", "bf": "2"})
    with av.open(str(path)) as container:
        pts = [p.pts for p in container.demux(video=0) if p.size]
    assert pts != sorted(pts)  # stored in decoding order
    assert [V.synthetic_index(f) for f in V.decode_video(path, fps=10.0)] == V.select_frames(60, 10.0, fps=10.0)


def test_variable_frame_rate_selects_by_index_at_the_average_rate(tmp_path):
    times = [0.02 * i for i in range(30)] + [0.6 + 0.08 * i for i in range(30)]  # 50 fps, then 12.5 fps
    path = clip(tmp_path, frames=60, fps=25, timestamps=times)
    info = V.probe(path)
    assert info.total_frames == 60 and 19 < info.avg_fps < 22  # 60 frames over ~3 s
    picks = V.select_frames(60, info.avg_fps)
    assert [V.synthetic_index(f) for f in V.decode_video(path)] == picks == [15, 44]


def test_rotated_frames_come_upright(tmp_path):
    path = clip(tmp_path, frames=3, size=(64, 32), rotation=90)
    (frame,) = V.decode_video(path, max_frames=1)
    assert frame.shape == (64, 32, 3)  # 32 x 64 stored, shown turned a quarter counter-clockwise
    # the code blocks were at the top left; a counter-clockwise turn puts them at the bottom left
    assert V.synthetic_index(np.rot90(frame, -1)) == 1


def test_odd_sized_and_single_frame_videos_encode(tmp_path, model):
    odd = clip(tmp_path, "odd.mkv", frames=25, size=(33, 17), codec="ffv1")
    assert V.decode_video(odd)[0].shape == (17, 33, 3)
    single = clip(tmp_path, "one.mp4", frames=1)
    assert [V.synthetic_index(f) for f in V.decode_video(single)] == [0]
    out = model.encode(videos=[odd, single], input_ids=[PROMPT])
    assert out.lengths == [len(PROMPT) - 1 + 2, len(PROMPT) - 1 + 1]  # 2.5 s: 2 frames; 1 frame


# --- bad files -------------------------------------------------------------------------------------
def truncate(path, fraction=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * fraction)])
    return path


def test_truncated_mp4_names_the_file_and_where_decoding_stopped(tmp_path, model):
    path = clip(tmp_path, frames=200, fps=10, container_options={"movflags": "+faststart"})  # header first
    truncate(path)
    assert V.probe(path).total_frames == 200  # the header still promises 200 frames
    with pytest.raises(ValueError, match=r"v\.mp4.*(failed at|ended at) frame.*t = \d+\.\d\d s") as e:
        model.encode(videos=[path], input_ids=[PROMPT])
    assert "frame 0 " not in str(e.value)


def test_truncated_matroska_is_refused_before_decoding(tmp_path):
    path = truncate(clip(tmp_path, "v.mkv", frames=200, fps=10, codec="ffv1"))
    with pytest.raises(ValueError, match=r"v\.mkv' is truncated: its frames end at \d+\.\d\d s .* declares 20\.00 s"):
        V.probe(path)


def test_corrupt_file_raises_instead_of_returning_a_partial_video(tmp_path):
    path = clip(tmp_path, frames=200, fps=50)
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    for i in rng.integers(len(data) // 3, 2 * len(data) // 3, 3000):
        data[i] = rng.integers(0, 256)
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"v\.mp4.* (failed at|corrupt at|ended at) frame \d+"):
        V.decode_video(path, fps=50)


@pytest.mark.parametrize("content, match", [(b"", "cannot open"), (b"plain text, not a video" * 10, "cannot open")])
def test_unreadable_files(tmp_path, model, content, match):
    path = tmp_path / "bad.mp4"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"video: {match} .*bad\.mp4"):
        model.encode(videos=[path], input_ids=[PROMPT])


def test_audio_only_file_has_no_video_stream(tmp_path):
    av = pytest.importorskip("av")
    path = tmp_path / "sound.m4a"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=8000, layout="mono")
        for i in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 8000, i * 1024
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    with pytest.raises(ValueError, match=r"sound\.m4a' has no video stream \(it holds: audio\)"):
        V.probe(path)


def test_video_without_frames(tmp_path):
    av = pytest.importorskip("av")
    path = tmp_path / "empty.mkv"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("ffv1", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        out.start_encoding()
    with pytest.raises(ValueError, match=r"empty\.mkv"):
        V.probe(path)


# --- bounded memory --------------------------------------------------------------------------------
class FramesAlive:
    """Counts decoded RGB frames and pixel chunks alive, sampled each time a frame is decoded."""

    def __init__(self, monkeypatch):
        self.lock = threading.Lock()
        self.rgb = self.chunks = 0
        self.max_rgb = self.max_chunks = 0
        self.chunk_rows = []
        to_rgb, new_chunk = V.to_rgb, V.new_chunk

        def counted_rgb(frame):
            out = np.array(to_rgb(frame))  # a fresh array we can watch
            with self.lock:
                self.rgb += 1
                self.max_rgb = max(self.max_rgb, self.rgb)
                self.max_chunks = max(self.max_chunks, self.chunks)
            weakref.finalize(out, self.drop, "rgb")
            return out

        def counted_chunk(rows, like, pin_memory):
            out = new_chunk(rows, like, pin_memory)
            with self.lock:
                self.chunks += 1
                self.chunk_rows.append(rows)
            weakref.finalize(out, self.drop, "chunks")
            return out

        monkeypatch.setattr(V, "to_rgb", counted_rgb)
        monkeypatch.setattr(V, "new_chunk", counted_chunk)

    def drop(self, kind):
        with self.lock:
            setattr(self, kind, getattr(self, kind) - 1)


@pytest.mark.parametrize("pipeline, most_chunks", [(False, 1), (True, 2)])
def test_a_long_video_holds_one_chunk_of_frames(tmp_path, monkeypatch, pipeline, most_chunks):
    """Done-when check: a 3-minute clip streams through the model with one chunk of decoded frames
    alive (two when pipelined: one in the model, the next one decoding), counted, not timed."""
    path = clip(tmp_path, frames=3 * 60 * 4, fps=4, size=(32, 24))  # 3 minutes at 4 fps: 180 frames selected
    torch.manual_seed(0)
    model = LlavaMini.from_preset("tiny")
    model.savings = Savings(frame_budget_bytes=8 * 1 << 20, pipeline_frames=pipeline)
    chunk = model.frame_chunk()
    assert 1 < chunk < 60
    expected = model.encode(videos=[V.decode_video(path)], input_ids=[PROMPT])  # all frames in memory
    alive = FramesAlive(monkeypatch)
    streamed = model.encode(videos=[path], input_ids=[PROMPT])
    torch.testing.assert_close(streamed.inputs_embeds, expected.inputs_embeds, rtol=0, atol=0)
    assert streamed.lengths == [180 + len(PROMPT) - 1]
    assert sum(alive.chunk_rows) == 180 and max(alive.chunk_rows) == chunk
    assert alive.max_rgb == 1  # each decoded frame is dropped once preprocessed
    assert alive.max_chunks <= most_chunks  # counted while each frame decodes, the one being filled included
    assert alive.rgb == alive.chunks == 0


def test_pipeline_keeps_order_raises_producer_errors_and_stops_when_closed():
    assert list(V.pipelined(iter(range(50)))) == list(range(50))

    def failing():
        yield 1
        raise ValueError("video: decoding 'x.mp4' failed at frame 1")

    with pytest.raises(ValueError, match="failed at frame 1"):
        list(V.pipelined(failing()))
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    before = threading.active_count()
    stream = V.pipelined(endless(), ahead=1)
    assert next(stream) == 0
    stream.close()
    assert threading.active_count() == before
    assert len(produced) <= 2  # the item in use and the one ahead: the producer waits for a free slot


def test_frame_lists_and_pixel_tensors_stream_too(model):
    frames = [np.random.default_rng(i).integers(0, 256, (30, 40, 3), dtype=np.uint8) for i in range(7)]
    clip_frames = V.open_video(frames, model.image_processor)
    chunks = list(clip_frames.chunks(3, pipeline=False))
    assert [c.shape[0] for c in chunks] == [3, 3, 1]
    pixels = torch.cat(chunks)
    views = list(V.open_video(pixels, model.image_processor).chunks(4))
    assert views[0].data_ptr() == pixels.data_ptr()  # ready pixels are sliced, never copied
    torch.testing.assert_close(model.encode(videos=[frames], input_ids=[PROMPT]).inputs_embeds,
                               model.encode(videos=[pixels], input_ids=[PROMPT]).inputs_embeds)
    with pytest.raises(ValueError, match=r"video frame 2: .*expected a numpy array"):
        model.encode(videos=[frames[:2] + [np.zeros((4, 4, 3, 2), np.uint8)]], input_ids=[PROMPT])
    with pytest.raises(TypeError, match="video: expected a file path, a list of frames or a pixel tensor"):
        model.encode(videos=[42], input_ids=[PROMPT])


def test_hd_model_splits_each_frame(tmp_path):
    torch.manual_seed(0)
    hd = LlavaMini.from_preset("tiny-hd")
    path = clip(tmp_path, frames=30, fps=10, size=(64, 48))
    out = hd.encode(videos=[path], input_ids=[PROMPT])
    assert out.lengths == [3 * hd.config.tokens_per_image + len(PROMPT) - 1]
    assert list(next(hd.prepare_video(path).chunks(8)).shape) == [3, 5, 3, 28, 28]


# --- the video prefix ------------------------------------------------------------------------------
def test_video_prefix_cost_per_frame_and_budget(model):
    frames = torch.rand(3, 3, 28, 28)
    prefix = model.prefix(video=frames)
    held = sum(t.numel() * t.element_size() for t in prefix.keys + prefix.values + [prefix.compressed])
    assert held == 3 * model.prefix_bytes_per_frame()
    with pytest.raises(ValueError, match=r"prefix would keep 3 frames x 0\.\d\d MiB = .* over the budget of"):
        model.prefix(video=frames, budget_bytes=2 * model.prefix_bytes_per_frame())
    model.prefix(video=frames, budget_bytes=3 * model.prefix_bytes_per_frame())


# --- long context ----------------------------------------------------------------------------------
def long_context_model(max_positions: int) -> LlavaMini:
    """One CLIP patch per frame and one-layer parts: 10,000 frames encode in seconds."""
    torch.manual_seed(0)
    config = LlavaMiniConfig(
        vision=dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=4,
                    patch_size=4, hidden_act="quick_gelu", projection_dim=8),
        text=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, vocab_size=64, max_position_embeddings=max_positions, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0, hidden_act="silu", tie_word_embeddings=False),
        compressor_heads=2, prefusion_layers=1, vision_feature_layer=-1, name="long-context")
    return LlavaMini.from_config(config)


def test_ten_thousand_frames_positions_masks_and_kv_cache():
    model = long_context_model(16_384)
    long_video, short_video = torch.rand(10_000, 3, 4, 4), torch.rand(3, 3, 4, 4)
    enc = model.encode(videos=[long_video, short_video], input_ids=[[1, 5, IMG, 7, 8], [1, IMG, 9]], backend="sdpa")
    n = 10_000 + 4
    assert enc.lengths == [n, 3 + 2]
    assert enc.position_ids[0].tolist() == list(range(n))
    assert enc.position_ids[1, -5:].tolist() == list(range(5))
    with torch.no_grad(), model.backend_scope("sdpa"):
        llm = model.llm
        batched = llm(inputs_embeds=enc.inputs_embeds, attention_mask=enc.attention_mask,
                      position_ids=enc.position_ids, use_cache=True)
        # the short row behind 10,000 positions of left padding: as if alone
        alone = llm(inputs_embeds=enc.inputs_embeds[1:, -5:], logits_to_keep=1).logits[0, -1]
        torch.testing.assert_close(batched.logits[1, -1], alone, rtol=1e-4, atol=1e-5)
        # one decode step through the 10,004-position KV cache == recomputing 10,005 positions
        token = batched.logits[:, -1].argmax(-1)
        new = llm.get_input_embeddings()(token)[:, None]
        mask = torch.cat([enc.attention_mask, enc.attention_mask.new_ones(2, 1)], dim=1)
        step = llm(inputs_embeds=new, attention_mask=mask, position_ids=enc.position_ids[:, -1:] + 1,
                   past_key_values=batched.past_key_values, use_cache=True).logits[0, -1]
        assert batched.past_key_values.get_seq_length() == n + 1
        full = llm(inputs_embeds=torch.cat([enc.inputs_embeds[:1], new[:1]], dim=1), logits_to_keep=1).logits[0, -1]
        torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-5)


def test_context_beyond_max_position_embeddings_is_refused_before_the_work():
    assert LlavaMiniConfig.from_preset("llava-mini-vicuna-7b").text["max_position_embeddings"] == 4096
    model = long_context_model(4096)
    frames = torch.rand(1, 3, 4, 4).expand(4_100, 3, 4, 4)
    with pytest.raises(ValueError, match=r"context: 4,103 tokens \(4,100 frames x 1 \+ 3 text tokens\) exceed "
                                         r"the LLM's max_position_embeddings of 4,096"):
        model.encode(videos=[frames], input_ids=[PROMPT])
    model.encode(videos=[frames[:4_093]], input_ids=[PROMPT])  # exactly 4,096 positions fit
    with pytest.raises(ValueError, match=r"context: 4,106 tokens \(a prompt of 4,096 \+ 10 new tokens\)"):
        model.generate(videos=[frames[:4_093]], input_ids=[PROMPT], max_new_tokens=10)


@pytest.mark.gpu
def test_device_memory_is_one_chunk_plus_tokens_per_frame():
    """CUDA: the encode peak grows with the video only by what it keeps per frame (C^2 tokens, fused rows)."""
    from llava_mini.profiling.memory import peak_memory

    torch.manual_seed(0)
    model = LlavaMini.from_preset("tiny", device="cuda")
    model.savings = Savings(frame_budget_bytes=4 << 20)
    chunk = model.frame_chunk()
    frame = torch.rand(1, 3, 28, 28)
    peaks = {}
    for frames in (4 * chunk, 32 * chunk):
        with peak_memory("cuda") as peak:
            out = model.encode(videos=[frame.expand(frames, 3, 28, 28)], input_ids=[PROMPT])
            del out
        peaks[frames] = peak.device_above_start
    d = model.config.text["hidden_size"]
    kept_per_frame = model.config.tokens_per_image * d * 4  # fp32 tokens, then the LLM input built from them
    growth = peaks[32 * chunk] - peaks[4 * chunk]
    assert growth <= 28 * chunk * 4 * kept_per_frame + (2 << 20)  # a few copies of the tokens, not frames
