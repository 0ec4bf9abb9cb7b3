"""Videos in bounded memory: probe a file, select frames by the released rule, decode only those
while the file streams, and hand the model chunks of pixel values from a background thread.

Frame selection (the released rule): ``int(total_frames // avg_fps)`` frames, one per second of
video, each the middle frame of one of that many equal segments of ``total_frames - 1``. Both
numbers come from the container (frame count, average frame rate) or, when it has no frame count,
from counting its packets: nothing is decoded to select. ``fps`` scales the count and
``max_frames`` caps it, both by the same rule; the defaults (1.0, None) are the released selection.

Memory: a file is decoded in order and only the selected frames are converted to RGB, one at a
time, each preprocessed at once into the chunk being filled. A consumer of ``VideoFrames.chunks``
holds one chunk; with ``pipeline=True`` the next chunk is decoded meanwhile on a background thread
(PyAV and torch release the GIL), so at most two chunks exist, whatever the video's length.
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from llava_mini.lmm import processing


# --- probe and select ------------------------------------------------------------------------------
@dataclass(frozen=True)
class VideoInfo:
    """What selection needs from a file, read without decoding it.

    ``frames_from``: ``"container"`` (the stream's frame count) or ``"packets"`` (counted by
    demuxing, for containers such as Matroska that store no count).
    """

    path: str
    total_frames: int
    avg_fps: float
    width: int
    height: int
    frames_from: str


def import_av():
    try:
        import av
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("decoding video files needs PyAV: pip install 'llava-mini[video]'") from e
    return av


def open_container(path: str):
    """Open a file with PyAV: a clear ValueError naming it when it is missing or unreadable."""
    if not Path(path).is_file():  # before PyAV: a wrong path is the error to report, with or without it
        raise ValueError(f"video: no such file {path!r}")
    av = import_av()
    try:
        return av.open(path)
    except (av.error.FFmpegError, IndexError, EOFError) as e:  # PyAV raises IndexError on empty MP4s
        raise ValueError(f"video: cannot open {path!r} as a video ({e})") from e


def video_stream(container, path: str):
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["nothing"]
        raise ValueError(f"video: {path!r} has no video stream (it holds: {', '.join(kinds)})")
    return container.streams.video[0]


def probe(path: str | os.PathLike) -> VideoInfo:
    """Frame count, average frame rate and size of a video file, without decoding a frame.

    The count is the container's when it stores one, else its packets are counted (a read of the
    file, no decoding). A counted stream that ends well before the duration it declares is a
    truncated file: ValueError.
    """
    path = str(path)
    with open_container(path) as container:
        stream = video_stream(container, path)
        total, frames_from, end = stream.frames, "container", None
        if total <= 0:
            try:
                total, end = count_packets(container, stream)
            except av.error.FFmpegError as e:
                raise ValueError(f"video: cannot read the packets of {path!r} ({e})") from e
            frames_from = "packets"
        rate = stream.average_rate or stream.guessed_rate
        declared = declared_duration(stream)
    if total <= 0:
        raise ValueError(f"video: {path!r} holds no video frames")
    if not rate or rate <= 0:
        raise ValueError(f"video: {path!r} declares no frame rate; pass its frames as a list instead")
    avg_fps = float(rate)
    if end is not None and declared is not None and end + 2 / avg_fps < declared:
        raise ValueError(f"video: {path!r} is truncated: its frames end at {end:.2f} s (frame {total}) "
                         f"but the stream declares {declared:.2f} s")
    return VideoInfo(path, total, avg_fps, stream.width, stream.height, frames_from)


def count_packets(container, stream) -> tuple[int, float | None]:
    """(number of video packets, end time in seconds of the last one) by demuxing, not decoding."""
    count, end = 0, None
    for packet in container.demux(stream):
        if packet.size == 0:  # the flush packet at the end
            continue
        count += 1
        if packet.pts is not None:
            stop = float((packet.pts + (packet.duration or 0)) * stream.time_base)
            end = stop if end is None else max(end, stop)
    if end is not None and stream.start_time is not None:
        end -= float(stream.start_time * stream.time_base)
    return count, end


def declared_duration(stream) -> float | None:
    """The stream's declared duration in seconds (its header, or Matroska's DURATION tag)."""
    if stream.duration:
        return float(stream.duration * stream.time_base)
    tag = stream.metadata.get("DURATION")
    if tag:
        try:
            h, m, s = tag.split(":")
            return int(h) * 3600 + int(m) * 60 + float(s)
        except ValueError:
            return None
    return None


def select_frames(total_frames: int, avg_fps: float, fps: float = 1.0, max_frames: int | None = None) -> list[int]:
    """Indices of the frames the model sees: the released rule, scaled by ``fps``, capped by ``max_frames``.

    ``int(total_frames * fps // avg_fps)`` frames (at fps=1 the released ``int(total // avg_fps)``),
    at least one (a video shorter than 1/fps s, where the released code selects none, gives its
    middle frame), at most ``total_frames`` and ``max_frames``; each index is the middle of one of
    that many equal segments of ``total_frames - 1`` (rounding half to even, as numpy does).
    Indices are sorted and may repeat when nearly every frame is selected (as released).
    """
    if not isinstance(total_frames, int) or total_frames < 1:
        raise ValueError(f"total_frames: expected a positive int, got {total_frames!r}")
    if not avg_fps > 0:
        raise ValueError(f"avg_fps: expected a positive number, got {avg_fps!r}")
    check_sampling(fps, max_frames)
    count = min(total_frames, max(1, int(total_frames * fps // avg_fps)))
    if max_frames is not None:
        count = min(count, max_frames)
    segment = float(total_frames - 1) / count
    return [(round(segment * i) + round(segment * (i + 1))) // 2 for i in range(count)]


def check_sampling(fps, max_frames) -> None:
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
        raise ValueError(f"fps: expected a positive number, got {fps!r}")
    if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1):
        raise ValueError(f"max_frames: expected a positive int or None, got {max_frames!r}")


# --- decode ----------------------------------------------------------------------------------------
def decode_frames(path: str | os.PathLike, indices: list[int], total_frames: int | None = None) -> Iterator[np.ndarray]:
    """Decode a file in order and yield the RGB frame [H, W, 3] uint8 at each of ``indices``.

    ``indices`` must be sorted (repeats allowed). Every frame up to the last index is decoded (the
    codec needs them) but only the selected ones are converted, each when it is yielded; nothing
    else is kept. Frames are turned upright by the stream's rotation. Decoding stops after the last
    index. A decoding error, a selected frame the decoder marks corrupt, or a file that ends
    before the last index raises ValueError naming the file and the frame and time.
    """
    path = str(path)
    av = import_av()
    if any(b < a for a, b in zip(indices, indices[1:])):
        raise ValueError("indices: expected sorted frame indices")
    if not indices:
        return
    wanted = iter(indices)
    target = next(wanted)
    index, seconds = 0, 0.0
    with open_container(path) as container:
        stream = video_stream(container, path)
        stream.thread_type = "AUTO"  # frame-parallel decoding; PyAV releases the GIL meanwhile
        try:
            for packet in container.demux(stream):
                if packet.pts is not None:
                    seconds = float(packet.pts * stream.time_base)
                for frame in packet.decode():
                    while target == index:
                        if frame.is_corrupt:
                            raise ValueError(f"video: {path!r} is corrupt at frame {index} "
                                             f"(t = {frame_seconds(frame, seconds):.2f} s)")
                        yield to_rgb(frame)
                        target = next(wanted, None)
                    if target is None:
                        return
                    index += 1
        except av.error.FFmpegError as e:
            raise ValueError(f"video: decoding {path!r} failed at frame {index} (t = {seconds:.2f} s): {e}") from e
    declared = f" of the {total_frames} it declares" if total_frames else ""
    raise ValueError(f"video: {path!r} ended at frame {index}{declared} (t = {seconds:.2f} s), before "
                     f"selected frame {target}: the file is truncated")


def frame_seconds(frame, fallback: float) -> float:
    return float(frame.time) if frame.time is not None else fallback


def to_rgb(frame) -> np.ndarray:
    """A decoded PyAV frame -> RGB uint8 [H, W, 3], turned upright by its display rotation."""
    rgb = frame.to_ndarray(format="rgb24")
    quarter_turns = round(frame.rotation / 90) % 4  # counter-clockwise, as the display matrix says
    return np.rot90(rgb, quarter_turns) if quarter_turns else rgb


def decode_video(path: str | os.PathLike, fps: float = 1.0, max_frames: int | None = None) -> list[np.ndarray]:
    """The selected frames of a file as a list of RGB arrays (all in memory: for short clips;
    the model streams files through ``open_video`` instead)."""
    check_sampling(fps, max_frames)
    info = probe(path)
    return list(decode_frames(path, select_frames(info.total_frames, info.avg_fps, fps, max_frames),
                              info.total_frames))


# --- preprocess in chunks --------------------------------------------------------------------------
def new_chunk(rows: int, like: torch.Tensor, pin_memory: bool) -> torch.Tensor:
    """An empty chunk of ``rows`` frames shaped like one preprocessed frame (pinned for async copies)."""
    return torch.empty((rows, *like.shape), dtype=like.dtype, pin_memory=pin_memory)


def pixel_chunks(frames: Iterable, count: int, size: int, processor, resolution_ratio: int = 1,
                 pin_memory: bool = False) -> Iterator[torch.Tensor]:
    """Preprocess ``count`` raw frames one at a time into chunks of ``size`` (the last may be shorter),
    each as the released video path does (``processing.preprocess_video_frames`` with ``processor``).

    Each frame is dropped as soon as it is preprocessed, and a chunk is dropped here once yielded,
    so this holds one chunk plus one raw frame.
    """
    chunk, filled, seen = None, 0, 0
    for frame in frames:  # not enumerate(): its reused result tuple would keep the previous frame alive
        if seen == count:
            raise ValueError(f"video: more frames than the {count} expected")
        try:
            row = processing.preprocess_video_frames([frame], processor, resolution_ratio)[0]
        except (ValueError, TypeError) as e:
            raise type(e)(f"video frame {seen}: {e}") from e
        del frame
        if chunk is None:
            chunk = new_chunk(min(size, count - seen), row, pin_memory)
        chunk[filled] = row
        filled, seen = filled + 1, seen + 1
        if filled == chunk.shape[0]:
            yield chunk
            chunk, filled = None, 0
    if seen != count:
        raise ValueError(f"video: {seen} frames arrived, {count} expected")


_END = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def pipelined(items: Iterable, ahead: int = 1) -> Iterator:
    """Produce ``items`` on a background thread, at most ``ahead`` items before the consumer.

    The producer starts item k + ahead + 1 only once the consumer has asked for item k + 1 (and so
    is done with item k): with ``ahead=1`` two items exist at most, the one in use and the next.
    Errors in the producer are raised in the consumer; closing the consumer stops the producer.
    """
    if not isinstance(ahead, int) or ahead < 1:
        raise ValueError(f"ahead: expected a positive int, got {ahead!r}")
    slots = threading.Semaphore(ahead + 1)
    handoff: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()

    def produce():
        source = iter(items)
        try:
            while not stop.is_set():
                if not slots.acquire(timeout=0.05):
                    continue
                item = next(source, _END)
                if item is _END:
                    break
                handoff.put(item)
                del item  # the item now lives only in the handoff and with the consumer
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            handoff.put(_Failure(e))
        finally:
            handoff.put(_END)
            close = getattr(source, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="llava-mini-video", daemon=True)
    thread.start()
    try:
        while True:
            item = handoff.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
            del item  # the consumer asked for the next one: this one is done with
            slots.release()
    finally:
        stop.set()
        thread.join()


# --- a video as the model sees it ------------------------------------------------------------------
@dataclass
class VideoFrames:
    """The frames of one video the model sees, produced chunk by chunk (never all at once).

    ``count`` is known up front (from the file's metadata for a file). Made by ``open_video``
    from a file, a list of raw frames, or ready pixel values; ``chunks`` can be iterated again.
    """

    name: str
    count: int
    processor: Any  # the CLIP image processor each raw frame goes through
    resolution_ratio: int = 1
    raw: Callable[[], Iterator] | None = None  # a fresh iterator over the raw frames (files, lists)
    pixels: torch.Tensor | None = None  # ready pixel values (sliced, never copied)

    def chunks(self, size: int, pipeline: bool = True, pin_memory: bool = False) -> Iterator[torch.Tensor]:
        """Pixel values in chunks of ``size`` frames [n, ...], in order. With ``pipeline`` the next
        chunk is decoded and preprocessed on a background thread while the current one is used."""
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size: expected a positive int, got {size!r}")
        if self.pixels is not None:
            return (self.pixels[i:i + size] for i in range(0, self.count, size))
        chunks = pixel_chunks(self.raw(), self.count, size, self.processor, self.resolution_ratio, pin_memory)
        return pipelined(chunks) if pipeline else chunks


def open_video(video, processor, resolution_ratio: int = 1, fps: float = 1.0,
               max_frames: int | None = None) -> VideoFrames:
    """A video file, a list of frames, or ready pixel values -> ``VideoFrames`` (nothing decoded yet).

    Files follow the released frame selection (see ``select_frames``); a list is taken frame by
    frame as given; a tensor [T, 3, S, S] (HD [T, r*r+1, 3, S, S]; S the ``processor``'s crop size)
    is taken as ready pixel values. Raw frames go through ``processor`` as the released video path does.
    """
    check_sampling(fps, max_frames)
    crop_size = processor.crop_size["height"]
    if isinstance(video, VideoFrames):
        return video
    if isinstance(video, (str, os.PathLike)):
        info = probe(video)
        indices = select_frames(info.total_frames, info.avg_fps, fps, max_frames)
        return VideoFrames(info.path, len(indices), processor, resolution_ratio,
                           raw=lambda: decode_frames(info.path, indices, info.total_frames))
    if isinstance(video, torch.Tensor):
        want = [3, crop_size, crop_size] if resolution_ratio == 1 else [resolution_ratio ** 2 + 1, 3, crop_size, crop_size]
        if list(video.shape[1:]) != want or video.shape[0] == 0:
            shape = ", ".join(map(str, want))
            raise ValueError(f"video: a tensor must hold ready pixel values [T > 0, {shape}], got "
                             f"{list(video.shape)}; pass raw frames as a list")
        return VideoFrames("pixels", video.shape[0], processor, resolution_ratio, pixels=video)
    if isinstance(video, (list, tuple)):
        if len(video) == 0:
            raise ValueError("video: expected at least one frame, got an empty video")
        frames = list(video)
        return VideoFrames("frames", len(frames), processor, resolution_ratio, raw=lambda: iter(frames))
    raise TypeError(f"video: expected a file path, a list of frames or a pixel tensor, got {type(video).__name__}")


def available_memory(device: torch.device) -> int | None:
    """Free bytes on ``device`` now: CUDA's free memory, or the host's MemAvailable (Linux); else None."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device.index if device.index is not None else torch.cuda.current_device())[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


# --- synthetic clips (tests, benchmarks) -----------------------------------------------------------
CODE_BLOCK = 16  # pixels per side of each of the two grey blocks that carry a synthetic frame's index


def write_synthetic_video(path: str | os.PathLike, frames: int, fps: float = 10, size: tuple[int, int] = (32, 32),
                          codec: str = "mpeg4", rotation: int = 0, timestamps: list[float] | None = None,
                          bit_rate: int | None = None, options: dict | None = None,
                          container_options: dict | None = None) -> Path:
    """Write a synthetic clip: frame i carries its index in two grey blocks at the top left (read
    back with ``synthetic_index``) over a gradient that moves with i.

    ``size`` is (width, height), at least (32, 16); ``rotation`` a display rotation in degrees
    (counter-clockwise); ``timestamps`` (seconds, one per frame) make a variable frame rate;
    ``options`` go to the encoder, ``container_options`` to the muxer (e.g. MP4 ``movflags``).
    """
    av = import_av()
    width, height = size
    if width < 2 * CODE_BLOCK or height < CODE_BLOCK:
        raise ValueError(f"size: expected at least ({2 * CODE_BLOCK}, {CODE_BLOCK}), got {size}")
    if timestamps is not None and len(timestamps) != frames:
        raise ValueError(f"timestamps: expected {frames}, got {len(timestamps)}")
    from fractions import Fraction

    path = Path(path)
    ramp = (np.arange(width + height, dtype=np.int64) * 255 // max(width + height - 1, 1)).astype(np.uint8)
    with av.open(str(path), mode="w", options=container_options or {}) as out:
        if options is None:  # MPEG-4 part 2 at its default rate blurs the code blocks
            options = {"qmax": "2"} if codec == "mpeg4" else {}
        stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1000), options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if bit_rate:
            stream.bit_rate = bit_rate
        if rotation:
            stream.set_display_rotation(rotation)
        if timestamps is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for i in range(frames):
            shift = (np.arange(width)[None, :] + np.arange(height)[:, None] + 4 * i) % (width + height)
            image = np.repeat(ramp[shift][..., None], 3, axis=2)
            image[:CODE_BLOCK, :CODE_BLOCK] = (i // 64 % 64) * 4
            image[:CODE_BLOCK, CODE_BLOCK:2 * CODE_BLOCK] = (i % 64) * 4
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if timestamps is not None:
                frame.pts, frame.time_base = round(timestamps[i] * 1000), Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def synthetic_index(rgb: np.ndarray) -> int:
    """The index a ``write_synthetic_video`` frame carries (exact up to 4,095 frames)."""
    inner = slice(4, CODE_BLOCK - 4)  # away from the block edges, where codecs blur
    high = rgb[inner, 4:CODE_BLOCK - 4].mean() / 4
    low = rgb[inner, CODE_BLOCK + 4:2 * CODE_BLOCK - 4].mean() / 4
    return int(round(high)) * 64 + int(round(low))
