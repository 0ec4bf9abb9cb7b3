"""Video files in vLLM with the released frame selection: the ``llava_mini`` video loader.

vLLM's own loaders sample frames uniformly (32 by default). Selecting ``--media-io-kwargs
'{"video": {"video_backend": "llava_mini"}}'`` (or ``VLLM_VIDEO_LOADER_BACKEND=llava_mini``;
``llava-mini serve`` sets it) decodes a video with PyAV and keeps the frames the released code
keeps: ``int(total_frames // avg_fps)``, one per second, at the middles of equal segments
(``llava_mini.lmm.video.select_frames``). Frames given as arrays are taken as they are.
"""

from __future__ import annotations

import tempfile
from typing import Any

import numpy as np

from llava_mini.lmm.video import decode_video, probe, select_frames

LOADER_NAME = "llava_mini"


def load_released_frames(data: bytes, fps: float = 1.0, max_frames: int | None = None) -> tuple[np.ndarray, dict]:
    """The frames of a video file's bytes that the released code selects: ([T, H, W, 3] uint8, metadata)."""
    with tempfile.NamedTemporaryFile(suffix=".video") as f:  # PyAV probes and decodes a path
        f.write(data)
        f.flush()
        info = probe(f.name)
        frames = decode_video(f.name, fps=fps, max_frames=max_frames)
    indices = select_frames(info.total_frames, info.avg_fps, fps, max_frames)
    metadata = {"total_num_frames": info.total_frames, "fps": info.avg_fps, "duration": info.total_frames / info.avg_fps,
                "video_backend": LOADER_NAME, "frames_indices": indices, "do_sample_frames": False}
    return np.stack(frames), metadata


def register_video_loader() -> None:
    """Register the ``llava_mini`` loader with vLLM's video loader registry."""
    from vllm.multimodal.video import VIDEO_LOADER_REGISTRY, VideoLoader

    if LOADER_NAME in VIDEO_LOADER_REGISTRY.name2class:
        return

    @VIDEO_LOADER_REGISTRY.register(LOADER_NAME)
    class ReleasedFrameLoader(VideoLoader):
        """Decodes with PyAV and keeps the released selection of frames (one per second)."""

        @classmethod
        def load_bytes(cls, data: bytes, num_frames: int = -1, fps: float = 1.0, **kwargs: Any):
            # num_frames (vLLM's default cap of 32) does not apply: the released rule picks the count;
            # "max_frames" in --media-io-kwargs caps it.
            return load_released_frames(data, fps=fps if fps and fps > 0 else 1.0, max_frames=kwargs.get("max_frames"))
