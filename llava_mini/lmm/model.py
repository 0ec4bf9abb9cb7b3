"""LLaVA-Mini on transformers parts: CLIP, compressor, projector, pre-fusion layers and a Llama LLM."""

from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch import nn
from transformers import CLIPVisionModel, GenerationConfig, LlamaForCausalLM
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from llava_mini.kernels import backend as backends
from llava_mini.lmm import processing
from llava_mini.lmm.compressor import Resampler
from llava_mini.lmm.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX, LlavaMiniConfig
from llava_mini.lmm.generation import LLMInput, generate
from llava_mini.lmm.prefusion import PreFusion, Prefix
from llava_mini.lmm.video import VideoFrames, available_memory, open_video


@dataclass
class Savings:
    """The exact structural savings of pre-fusion; all off gives the released computation.

    prefix_split: run the vision + compressed rows once (a ``Prefix``), then only the text rows.
    prune_last_layer: the last pre-fusion layer computes only the rows that are used.
    batch_frames: video frames go through the model in batched chunks, not one at a time.
    frame_budget_bytes: activation memory one chunk of frames may use (sizes the chunks).
    pipeline_frames: a video's next chunk is decoded and preprocessed on a background thread while
        the model works on the current one (same result; off decodes in line).
    """

    prefix_split: bool = True
    prune_last_layer: bool = True
    batch_frames: bool = True
    frame_budget_bytes: int = 4 << 30
    pipeline_frames: bool = True


@contextlib.contextmanager
def default_dtype_and_device(dtype, device):
    old = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            yield
    finally:
        torch.set_default_dtype(old)


def frames_per_chunk(config: LlavaMiniConfig, itemsize: int, budget_bytes: int) -> int:
    """Video frames per batched launch: ``budget_bytes`` of activations over a per-frame estimate
    (CLIP on each of the frame's crops, its pre-fusion rows) at ``itemsize`` bytes per value. The
    model and the memory planner both size chunks by it."""
    t, v = config.text, config.vision
    crops = config.crops_per_image
    rows = crops * config.num_patches + config.tokens_per_image
    kv = 2 * max(config.prefusion_layers, 1) * t["num_key_value_heads"] * (t["hidden_size"] // t["num_attention_heads"])
    prefusion = rows * (kv + 4 * t["hidden_size"] + 2 * t["intermediate_size"])
    clip = crops * ((config.num_patches + 1) * (6 * v["hidden_size"] + v["intermediate_size"])
                    + v["num_attention_heads"] * (config.num_patches + 1) ** 2)
    return max(1, budget_bytes // ((prefusion + clip) * itemsize))


class LlavaMiniEncoder(nn.Module):
    """Everything of LLaVA-Mini before the LLM: CLIP, the compressor, the projector and pre-fusion.

    It turns images, HD images and videos with their prompts into what the LLM receives
    (``encode``, or ``llm_rows`` per prompt). ``LlavaMini`` adds the LLM; the vLLM plugin
    (``llava_mini.serving``) pairs it with vLLM's own LLM, passing that LLM's token embedding as
    ``embed_tokens``. The pre-fusion layers run with ``text_config`` (the LLM's config object, so
    one attention switch serves both).
    """

    def __init__(self, config: LlavaMiniConfig, text_config, embed_tokens=None, savings: Savings | None = None):
        super().__init__()
        if not isinstance(config, LlavaMiniConfig):
            raise TypeError(f"config: expected a LlavaMiniConfig, got {type(config).__name__}")
        self.config = config
        self.savings = savings or Savings()
        self._backend: str | None = None
        self._embed_tokens = embed_tokens
        self.tokenizer = None
        # The CLIP image processor; a checkpoint's preprocessor_config.json replaces it on loading.
        self.image_processor = processing.clip_image_processor(config.crop_size)
        self.vision_tower = CLIPVisionModel(config.vision_config())
        dv, d = config.vision["hidden_size"], text_config.hidden_size
        self.compressor = Resampler(config.compressor_size, dv, config.compressor_heads)
        self.mm_projector = nn.Sequential(nn.Linear(dv, d), nn.GELU(), nn.Linear(d, d))
        self.prefusion = PreFusion(text_config, config.prefusion_layers)

    @property
    def text_config(self):
        """The LLM's config (shared with the pre-fusion layers)."""
        return self.prefusion.config

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """The LLM's plain token embeddings of ``ids`` (any shape, ids >= 0)."""
        if self._embed_tokens is None:
            raise NotImplementedError("embed_tokens: give the LLM's token embedding as embed_tokens=")
        return self._embed_tokens(ids)

    @property
    def device(self) -> torch.device:
        return self.mm_projector[0].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.mm_projector[0].weight.dtype

    # --- backend ---------------------------------------------------------------------------------
    def set_backend(self, name: str | None) -> "LlavaMiniEncoder":
        """Pick this model's backend ("torch", "sdpa", "triton", "flash_attn"; None follows the default)."""
        self._backend = None if name is None else backends.validate(name)
        return self

    @contextlib.contextmanager
    def backend_scope(self, backend: str | None = None):
        """Run a block on ``backend`` (else this model's, else the process default/environment)."""
        name = backends.validate(backend) if backend is not None else (self._backend or backends.get_backend())
        with backends.configs_on_backend(name, self.text_config, self.vision_tower.config):
            yield name

    # --- stages ------------------------------------------------------------------------------------
    def vision_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP features of crops [n, 3, S, S]: the chosen hidden state without CLS, [n, N, Dv]."""
        out = self.vision_tower(pixels.to(self.device, self.dtype), output_hidden_states=True)
        return out.hidden_states[self.config.vision_feature_layer][:, 1:]

    def embed_vision(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels -> (projected vision tokens [B, Nv, d], projected compressed tokens [B, C^2, d]).

        Standard: Nv = N. HD (ratio r): the r x r crops' features are tiled into one (r*grid)^2 map,
        compressed, and Nv = r^2 N + N (tiled crops, then the global view), as released.
        """
        self.check_pixels(pixels)
        r = self.config.resolution_ratio
        if r == 1:
            feats = self.vision_features(pixels)
            return self.mm_projector(feats), self.mm_projector(self.compressor(feats))
        feats = self.vision_features(pixels.flatten(0, 1)).view(pixels.shape[0], r * r + 1, self.config.num_patches, -1)
        crops = self.tile_crops(feats)
        vision = torch.cat([self.mm_projector(crops), self.mm_projector(feats[:, -1])], dim=1)
        return vision, self.mm_projector(self.compressor(crops))

    def tile_crops(self, feats: torch.Tensor) -> torch.Tensor:
        """HD: the r x r crops' features [B, r*r(+1), N, Dv] -> one (r*grid)^2 map [B, r*r*N, Dv], row-major."""
        r, g = self.config.resolution_ratio, self.config.grid
        b = feats.shape[0]
        return feats[:, :r * r].reshape(b, r, r, g, g, -1).transpose(2, 3).reshape(b, r * g * r * g, -1)

    def check_pixels(self, pixels, argument: str = "images") -> None:
        """Pixel values must be [B, 3, S, S], or [B, r*r + 1, 3, S, S] for an HD model (B > 0)."""
        s, r = self.config.crop_size, self.config.resolution_ratio
        want = [3, s, s] if r == 1 else [r * r + 1, 3, s, s]
        if (not isinstance(pixels, torch.Tensor) or list(pixels.shape[1:]) != want or pixels.dim() != len(want) + 1
                or pixels.shape[0] == 0):
            got = list(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
            raise ValueError(f"{argument}: expected pixel values [B > 0, {', '.join(map(str, want))}], got {got}")

    def prepare_images(self, images) -> torch.Tensor:
        """A list of images (PIL, numpy, tensors [3, H, W], paths) -> pixel values on device.

        Preprocessed as released: padded to a square when ``config.image_aspect_ratio`` is "pad",
        HD models split into r x r blocks plus the whole image, then ``self.image_processor``.
        A batched tensor ([B, 3, S, S], HD [B, r*r+1, 3, S, S]) is taken as ready pixel values.
        """
        if isinstance(images, torch.Tensor) and images.dim() >= 4:
            pixels = images
        else:
            pixels = processing.preprocess_images(images, self.image_processor, self.config.resolution_ratio,
                                                  pad=self.config.image_aspect_ratio == "pad")
        self.check_pixels(pixels)
        return pixels.to(self.device, self.dtype)

    def prepare_video(self, video, fps: float = 1.0, max_frames: int | None = None) -> VideoFrames:
        """A video file, a list of frames or ready pixel values -> ``VideoFrames`` (nothing decoded yet).

        Files follow the released frame selection (``int(total_frames // avg_fps)`` frames at the
        middles of equal segments); ``fps`` scales the count and ``max_frames`` caps it. Frames are
        decoded, preprocessed and moved to the device one chunk at a time (``frame_chunks``).
        """
        return open_video(video, self.image_processor, self.config.resolution_ratio, fps, max_frames)

    def frame_chunks(self, frames: VideoFrames):
        """Consecutive chunks of frame pixels on the device: ``frame_chunk()`` frames at a time, or
        one by one (the released per-frame loop) when ``savings.batch_frames`` is off. With
        ``savings.pipeline_frames`` the next chunk decodes on a background thread meanwhile."""
        size = self.frame_chunk() if self.savings.batch_frames else 1
        chunks = frames.chunks(size, pipeline=self.savings.pipeline_frames, pin_memory=self.device.type == "cuda")
        # map keeps no reference to a chunk it has handed on: the caller alone decides when it is freed.
        # contiguous: a slice of expanded or permuted pixels would send CLIP's convolution down a slow path
        return map(lambda chunk: chunk.to(self.device, self.dtype, non_blocking=True).contiguous(), chunks)

    @torch.no_grad()
    def prefix(self, images=None, video=None, fps: float = 1.0, max_frames: int | None = None,
               budget_bytes: int | None = None, backend: str | None = None) -> Prefix:
        """The text-independent pre-fusion of images (one row each) or of one video's frames.

        Keep it and pass it as ``prefix=`` to ``encode``/``generate``: further questions about the
        same images then run pre-fusion over their text only. A video's prefix keeps every frame's
        pre-fusion keys/values (``prefix_bytes_per_frame()`` each: about 38 MB per frame for
        Vicuna-7B in bf16, so ~37 GB for 1,000 frames); a video whose prefix would exceed
        ``budget_bytes`` (default: the device's free memory) is refused before any work. To
        answer one question about a long video, ``encode(videos=...)`` keeps only C^2 tokens per frame.
        """
        if (images is None) == (video is None):
            raise ValueError("prefix: give exactly one of images= or video=")
        with self.backend_scope(backend):
            if video is not None:
                frames = self.prepare_video(video, fps, max_frames)
                self.check_prefix_budget(frames.count, budget_bytes)
                return self.prefix_frames(frames)
            return self.prefusion.prefix(*self.embed_vision(self.prepare_images(images)),
                                         prune_last_layer=self.savings.prune_last_layer)

    def prefix_frames(self, frames: VideoFrames) -> Prefix:
        """Every frame's prefix, kept (its keys/values cost memory per frame: for caching only)."""
        return Prefix.cat(list(map(self.prefix_chunk, self.frame_chunks(frames))))

    def prefix_chunk(self, pixels: torch.Tensor) -> Prefix:
        return self.prefusion.prefix(*self.embed_vision(pixels), self.savings.prune_last_layer)

    def prefix_bytes_per_frame(self) -> int:
        """Bytes a video prefix keeps per frame: every pre-fusion layer's keys and values for the
        frame's vision + compressed rows, plus its C^2 pre-fused tokens."""
        t = self.config.text
        rows = self.config.num_patches * self.config.crops_per_image + self.config.tokens_per_image
        head_dim = t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"]
        kv = self.config.prefusion_layers * 2 * t["num_key_value_heads"] * head_dim * rows
        itemsize = torch.finfo(self.dtype).bits // 8
        return (kv + self.config.tokens_per_image * t["hidden_size"]) * itemsize

    def check_prefix_budget(self, frames: int, budget_bytes: int | None) -> None:
        """Refuse a video prefix of ``frames`` frames that would not fit ``budget_bytes`` (default: free memory)."""
        source = "given"
        if budget_bytes is None:
            budget_bytes, source = available_memory(self.device), f"free on {self.device.type}"
            if budget_bytes is None:
                return
        per_frame = self.prefix_bytes_per_frame()
        need = frames * per_frame
        if need > budget_bytes:
            gib = 1 << 30
            raise ValueError(
                f"video: its prefix would keep {frames:,} frames x {per_frame / (1 << 20):,.2f} MiB = {need / gib:,.2f} GiB "
                f"of pre-fusion keys/values, over the budget of {budget_bytes / gib:,.2f} GiB ({source}); "
                f"encode(videos=...) keeps only {self.config.tokens_per_image} token(s) per frame, or pass "
                f"max_frames= or a larger budget_bytes=")

    def frame_chunk(self) -> int:
        """Frames per batched launch: the activation budget over a per-frame estimate."""
        return frames_per_chunk(self.config, torch.finfo(self.dtype).bits // 8, self.savings.frame_budget_bytes)

    # --- text ------------------------------------------------------------------------------------
    def prompt_ids(self, input_ids=None, prompts=None, attention_mask=None, with_image: bool = True) -> list[list[int]]:
        """Token ids from ``input_ids`` (ids, lists or a tensor) or text ``prompts`` (needs a tokenizer)."""
        if (input_ids is None) == (prompts is None):
            raise ValueError("give exactly one of input_ids= or prompts=")
        if input_ids is not None:
            return processing.as_id_lists(input_ids, attention_mask)
        if self.tokenizer is None:
            raise ValueError("prompts: text prompts need a tokenizer (load a checkpoint that has one, "
                             "or set model.tokenizer); pass input_ids instead")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return [processing.tokenize_prompt(processing.apply_template(p, self.config.template, with_image),
                                           self.tokenizer) for p in prompts]

    def embed_text(self, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded text embeddings [B, L, d] and validity [B, L] (ids <= 0 are padding, as released)."""
        longest = max(map(len, ids))
        padded = torch.zeros(len(ids), longest, dtype=torch.long, device=self.device)
        for i, row in enumerate(ids):
            padded[i, :len(row)] = torch.tensor(row, device=self.device)
        return self.embed_tokens(padded.clamp(min=0)), padded > 0

    # --- encode ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images=None, input_ids=None, *, prompts=None, videos=None, prefix: Prefix | None = None,
               attention_mask=None, fps: float = 1.0, max_frames: int | None = None,
               backend: str | None = None) -> LLMInput:
        """What the LLM receives: fused text with each prompt's ``<image>`` replaced by its vision tokens.

        Give one of ``images`` (a list, one per prompt), ``videos`` (a list of files or frame lists,
        one per prompt), ``prefix`` (from ``prefix()``, one row per prompt), or none (text only).
        Prompts are ``input_ids`` (holding IMAGE_TOKEN_INDEX once) or text ``prompts``. Video files
        stream: memory holds a chunk or two of frames and C^2 tokens per frame (see ``prepare_video``).
        A result longer than the LLM's ``max_position_embeddings`` raises ValueError (before the
        work, for videos). The prompts' rows (``llm_rows``), left-padded into one batch.
        """
        out = LLMInput.left_pad(self.llm_rows(images, input_ids, prompts=prompts, videos=videos, prefix=prefix,
                                              attention_mask=attention_mask, fps=fps, max_frames=max_frames,
                                              backend=backend))
        self.check_context_length(out.inputs_embeds.shape[1])
        return out

    @torch.no_grad()
    def llm_rows(self, images=None, input_ids=None, *, prompts=None, videos=None, prefix: Prefix | None = None,
                 attention_mask=None, fps: float = 1.0, max_frames: int | None = None,
                 backend: str | None = None) -> list[torch.Tensor]:
        """What the LLM receives for each prompt, one [T_i, d] tensor per prompt (inputs as for ``encode``).

        With an image or video: the fused text before ``<image>``, the vision tokens, the fused text
        after it, cut to ``tokenizer_model_max_length`` (as released); text only: plain embeddings.
        """
        return self.truncate(self.uncut_rows(images, input_ids, prompts=prompts, videos=videos, prefix=prefix,
                                             attention_mask=attention_mask, fps=fps, max_frames=max_frames,
                                             backend=backend))

    def uncut_rows(self, images=None, input_ids=None, *, prompts=None, videos=None, prefix: Prefix | None = None,
                   attention_mask=None, fps: float = 1.0, max_frames: int | None = None,
                   backend: str | None = None) -> list[torch.Tensor]:
        """``llm_rows`` before the ``tokenizer_model_max_length`` cut, under the caller's grad mode
        (``forward`` trains through it)."""
        sources = [s is not None for s in (images, videos, prefix)]
        if sum(sources) > 1:
            raise ValueError("give at most one of images=, videos=, prefix=")
        ids = self.prompt_ids(input_ids, prompts, attention_mask, with_image=any(sources))
        with self.backend_scope(backend):
            if not any(sources):
                return [self.embed_tokens(torch.tensor(r, device=self.device).clamp(min=0)) for r in ids]
            for i, row in enumerate(ids):
                self.image_position(row, i)
            if videos is not None:
                videos = list(videos) if isinstance(videos, (list, tuple)) else [videos]
                ids = self.broadcast(ids, len(videos), "videos")
                clips = [self.prepare_video(v, fps, max_frames) for v in videos]
                cut = self.config.tokenizer_model_max_length  # truncation (as released) comes first
                for clip, row in zip(clips, ids):
                    tokens = clip.count * self.config.tokens_per_image + len(row) - 1
                    self.check_context_length(tokens if cut is None else min(tokens, cut),
                                              f"{clip.count:,} frames x {self.config.tokens_per_image} + "
                                              f"{len(row) - 1} text tokens")
                fused = [self.fuse_video(clip, r) for clip, r in zip(clips, ids)]
            else:
                if prefix is None:
                    pixels = self.prepare_images(images)
                    ids = self.broadcast(ids, pixels.shape[0], "images")
                    vision, compressed = self.embed_vision(pixels)
                    if self.savings.prefix_split:
                        prefix = self.prefusion.prefix(vision, compressed, self.savings.prune_last_layer)
                if prefix is not None:
                    ids = self.broadcast(ids, prefix.compressed.shape[0], "prefix")
                    fused = zip(*self.fuse_text(prefix, ids))
                else:
                    fused = zip(*self.fuse_reference(vision, compressed, ids))
            image_pos = [self.image_position(r, i) for i, r in enumerate(ids)]
            return [torch.cat([text[:p], vis, text[p + 1:len(r)]]) for (vis, text), p, r in zip(fused, image_pos, ids)]

    def truncate(self, rows: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each prompt's LLM input cut to ``config.tokenizer_model_max_length`` positions (as released);
        warns when it cuts."""
        limit = self.config.tokenizer_model_max_length
        longest = max(r.shape[0] for r in rows)
        if limit is None or longest <= limit:
            return rows
        warnings.warn(f"tokenizer_model_max_length: the LLM input ({longest} positions) is cut to the config's "
                      f"limit of {limit}, as the released code does; the tokens after it are dropped")
        return [r[:limit] for r in rows]

    def check_context_length(self, tokens: int, detail: str = "") -> None:
        """Refuse a sequence longer than the LLM's ``max_position_embeddings`` (past it, RoPE
        positions run beyond what the model was trained on, silently)."""
        limit = self.text_config.max_position_embeddings
        if tokens > limit:
            detail = f" ({detail})" if detail else ""
            raise ValueError(f"context: {tokens:,} tokens{detail} exceed the LLM's max_position_embeddings "
                             f"of {limit:,}; use fewer frames (max_frames=, fps=) or a longer-context LLM")

    def broadcast(self, ids, count: int, argument: str) -> list[list[int]]:
        if len(ids) == count:
            return ids
        if len(ids) == 1:
            return ids * count
        raise ValueError(f"{argument}: {count} given for {len(ids)} prompts; expected one per prompt (or one prompt)")

    @staticmethod
    def image_position(ids: list[int], row: int) -> int:
        count = ids.count(IMAGE_TOKEN_INDEX)
        if count != 1:
            raise ValueError(f"input_ids[{row}]: expected exactly one image placeholder ({IMAGE_TOKEN_INDEX}), found {count}")
        return ids.index(IMAGE_TOKEN_INDEX)

    def fuse_reference(self, vision, compressed, ids):
        """The released pre-fusion over [vision ; compressed ; text] -> (vision tokens, fused text)."""
        text, valid = self.embed_text(ids)
        x = torch.cat([vision, compressed, text], dim=1)
        full_valid = torch.cat([valid.new_ones(vision.shape[0], vision.shape[1] + compressed.shape[1]), valid], dim=1)
        c = compressed.shape[1]
        out = self.prefusion.reference(x, full_valid, self.savings.prune_last_layer, keep_last=c + text.shape[1])
        return out[:, :c], self.unfuse_invalid(out[:, c:], text, valid)

    def fuse_text(self, prefix: Prefix, ids):
        """Pre-fuse only the text rows against a prefix -> (vision tokens, fused text)."""
        text, valid = self.embed_text(ids)
        return prefix.compressed, self.unfuse_invalid(self.prefusion.text(prefix, text, valid), text, valid)

    @staticmethod
    def unfuse_invalid(fused, text, valid):
        """Rows with id <= 0 (padding, the placeholder, a real token with id 0) get their plain
        (unfused) embedding back, as released."""
        return torch.where(valid[..., None], fused, text)

    def fuse_video(self, frames, ids: list[int]):
        """One prompt over T frames: (all frames' tokens [T*C^2, d], fused text averaged over frames in fp32).

        ``frames``: ``VideoFrames`` or anything ``prepare_video`` takes. Chunk by chunk: each chunk's
        pixels and pre-fusion keys/values are dropped once its text is fused, so memory holds one
        chunk's activations and the C^2 tokens per frame.
        """
        if not isinstance(frames, VideoFrames):
            frames = self.prepare_video(frames)
        # what the loop keeps is allocated once, up front: nothing long-lived is interleaved with the
        # chunks' transient activations, so the allocator reuses the same memory for every chunk
        d = self.text_config.hidden_size
        compressed = torch.empty(frames.count, self.config.tokens_per_image, d, dtype=self.dtype, device=self.device)
        total = torch.zeros(len(ids), d, dtype=torch.float32, device=self.device)
        done = 0
        for chunk in self.frame_chunks(frames):
            vision, comp = self.embed_vision(chunk)
            rows = [ids] * chunk.shape[0]
            del chunk  # free these frames before the next chunk is decoded
            if self.savings.prefix_split:
                comp, text = self.fuse_text(self.prefusion.prefix(vision, comp, self.savings.prune_last_layer), rows)
            else:
                comp, text = self.fuse_reference(vision, comp, rows)
            compressed[done:done + comp.shape[0]] = comp
            done += comp.shape[0]
            total += text.float().sum(0)
        return compressed.flatten(0, 1), (total / frames.count).to(self.dtype)

class LlavaMini(LlavaMiniEncoder):
    """LLaVA-Mini: one (C x C) vision token per image for the LLM, vision fused into text beforehand.

    Build from a config or a preset (``LlavaMini.from_preset("tiny")``), or load a local checkpoint
    in the released layout (``LlavaMini.from_pretrained(dir)``). Run images, HD images and videos
    with ``encode`` (what the LLM receives) and ``generate``. ``set_backend`` picks the path of
    the hot operations ("torch" reference, "sdpa", "triton", "flash_attn").
    """

    def __init__(self, config: LlavaMiniConfig, savings: Savings | None = None):
        if not isinstance(config, LlavaMiniConfig):
            raise TypeError(f"config: expected a LlavaMiniConfig, got {type(config).__name__}")
        text_config = config.text_config()
        text_config._attn_implementation = "eager"
        llm = LlamaForCausalLM(text_config)
        # The pre-fusion layers share the LLM's config object: one attention switch for both.
        super().__init__(config, llm.config, savings=savings)
        self.llm = llm

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm.get_input_embeddings()(ids)

    # --- construction --------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, dtype: torch.dtype | None = None, device=None, **overrides) -> "LlavaMini":
        """A randomly initialised model of preset ``name`` (see ``LlavaMiniConfig.presets()``)."""
        return cls.from_config(LlavaMiniConfig.from_preset(name, **overrides), dtype=dtype, device=device)

    @classmethod
    def from_config(cls, config: LlavaMiniConfig, dtype: torch.dtype | None = None, device=None) -> "LlavaMini":
        """A randomly initialised model built directly in ``dtype`` on ``device`` (eval mode)."""
        with default_dtype_and_device(dtype, device):
            model = cls(config)
        return model.to(dtype=dtype).eval() if dtype is not None else model.eval()

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device=None, strict: bool = True) -> "LlavaMini":
        """Load a local directory in the released layout (config.json + sharded safetensors)."""
        from llava_mini.lmm.checkpoint import load_pretrained

        return load_pretrained(cls, path, dtype=dtype, device=device, strict=strict)

    def save_pretrained(self, path, max_shard_bytes: int = 2 << 30, dtype: torch.dtype | None = None) -> None:
        """Write the released layout: config.json, safetensors shards and their index, the image
        processor's preprocessor_config.json (and the tokenizer). ``dtype`` stores the weights in
        another dtype than the model's (e.g. bfloat16)."""
        from llava_mini.lmm.checkpoint import save_pretrained

        save_pretrained(self, path, max_shard_bytes=max_shard_bytes, dtype=dtype)

    # --- training ------------------------------------------------------------------------------------
    def forward(self, images=None, input_ids=None, labels=None, videos=None, attention_mask=None, *,
                prefix: Prefix | None = None, fps: float = 1.0, max_frames: int | None = None,
                backend: str | None = None, **llm_kwargs) -> CausalLMOutputWithPast:
        """A training (or scoring) forward pass, as the released code computes it: transformers'
        ``CausalLMOutputWithPast`` with ``logits`` [B, T, V] over the LLM input and, given ``labels``,
        ``loss``.

        Inputs as for ``encode`` (``input_ids``: ids, lists or a tensor [B, L]; ``attention_mask``
        marks the real tokens of a padded tensor). ``labels`` is shaped like ``input_ids`` (the same
        mask applies), ``IGNORE_INDEX`` (-100) where no loss is taken. As in the released
        ``prepare_inputs_labels_for_multimodal``: each prompt's labels are expanded over its vision
        tokens with ``IGNORE_INDEX`` (the ``<image>`` position itself is replaced), embeddings and
        labels are cut together to ``tokenizer_model_max_length``, and the ragged batch is padded on
        the right (embeddings zero, labels ``IGNORE_INDEX``, attention mask 0, positions 0..T_i-1 per
        row). The loss is the LLM's: logits shifted by one against the labels, cross-entropy in fp32,
        mean over the kept positions; labels with no kept position give a NaN loss, as released.

        Savings in training: ``prefix_split`` and ``prune_last_layer`` are plain differentiable
        tensor operations, so they stay on and exact under autograd (tests check every gradient
        against the released all-rows computation). Runs under the caller's grad mode; extra keyword
        arguments go to the LLM (``use_cache`` defaults to False here).
        """
        if labels is not None and input_ids is None:
            raise ValueError("labels: need input_ids= (labels are shaped like input_ids)")
        with self.backend_scope(backend) as name:
            rows = self.uncut_rows(images, input_ids, videos=videos, prefix=prefix, attention_mask=attention_mask,
                                   fps=fps, max_frames=max_frames, backend=name)
            targets = None
            if labels is not None:
                multimodal = any(x is not None for x in (images, videos, prefix))
                targets = self.expand_labels(input_ids, labels, attention_mask, rows, multimodal)
            limit = self.config.tokenizer_model_max_length
            if limit is not None:  # the released cut: embeddings and labels together
                rows = [r[:limit] for r in rows]
                targets = None if targets is None else [t[:limit] for t in targets]
            embeds, mask, positions, padded_labels = self.right_pad(rows, targets)
            self.check_context_length(embeds.shape[1])
            llm_kwargs.setdefault("use_cache", False)
            return self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, labels=padded_labels,
                            **llm_kwargs)

    def expand_labels(self, input_ids, labels, attention_mask, rows: list[torch.Tensor],
                      multimodal: bool) -> list[torch.Tensor]:
        """Each prompt's labels with its ``<image>`` position replaced by IGNORE_INDEX over its vision tokens."""
        ids = self.prompt_ids(input_ids, None, attention_mask)
        if isinstance(labels, torch.Tensor) and isinstance(input_ids, torch.Tensor) and labels.shape != input_ids.shape:
            raise ValueError(f"labels: expected the shape of input_ids {list(input_ids.shape)}, got {list(labels.shape)}")
        try:
            lab = processing.as_id_lists(labels, attention_mask)
        except (TypeError, ValueError) as error:
            raise ValueError(f"labels: expected ids shaped like input_ids ({error})") from None
        if len(lab) != len(ids) or any(len(a) != len(b) for a, b in zip(lab, ids)):
            raise ValueError(f"labels: expected the shape of input_ids (row lengths {[len(r) for r in ids]}), "
                             f"got row lengths {[len(r) for r in lab]}")
        lab = self.broadcast(lab, len(rows), "labels")
        ids = self.broadcast(ids, len(rows), "labels")
        out = []
        for row, r, lb in zip(rows, ids, lab):
            if multimodal:
                p, vision = self.image_position(r, 0), row.shape[0] - (len(r) - 1)
                lb = lb[:p] + [IGNORE_INDEX] * vision + lb[p + 1:]
            out.append(torch.tensor(lb, dtype=torch.long, device=row.device))
        return out

    @staticmethod
    def right_pad(rows: list[torch.Tensor], labels: list[torch.Tensor] | None):
        """The released training batch: rows padded on the right -> (embeds, mask, positions, labels)."""
        longest = max(r.shape[0] for r in rows)
        first = rows[0]
        embeds = torch.stack([torch.cat([r, r.new_zeros(longest - r.shape[0], r.shape[1])]) for r in rows])
        mask = torch.zeros(len(rows), longest, dtype=torch.long, device=first.device)
        positions = torch.zeros(len(rows), longest, dtype=torch.long, device=first.device)
        padded = None if labels is None else torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long,
                                                         device=first.device)
        for i, r in enumerate(rows):
            mask[i, :r.shape[0]] = 1
            positions[i, :r.shape[0]] = torch.arange(r.shape[0], device=first.device)
            if padded is not None:
                padded[i, :r.shape[0]] = labels[i]
        return embeds, mask, positions, padded

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute activations in the backward instead of keeping them: the LLM's and CLIP's
        decoder layers (transformers' own switch) and the pre-fusion layers (``PreFusion``
        checkpoints each layer itself, keeping its prefix keys/values). Non-reentrant by default;
        the recompute runs on the backend the forward ran on. Applies in training mode
        (``model.train()``), as in transformers."""
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        checkpoint = functools.partial(self.checkpoint_on_backend, kwargs=kwargs)
        for model in (self.llm, self.vision_tower):
            # transformers 5.25 renamed the switch (the old name warns); earlier versions have only the old one
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        for module in (*self.llm.modules(), *self.vision_tower.modules()):
            if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
                module._gradient_checkpointing_func = checkpoint
        self.prefusion.checkpoint = checkpoint

    def checkpoint_on_backend(self, function, *args, kwargs: dict):
        """torch.utils.checkpoint of ``function``, its backward recompute on the forward's backend
        (``backend_scope`` has ended by then, and the attention implementation with it)."""
        name = backends.get_backend()
        configs = (self.text_config, self.vision_tower.config)
        impls = [c._attn_implementation for c in configs]

        def on_forward_backend(*inputs):
            previous = [c._attn_implementation for c in configs]
            for c, impl in zip(configs, impls):
                c._attn_implementation = impl
            try:
                with backends.use_backend(name):
                    return function(*inputs)
            finally:
                for c, impl in zip(configs, previous):
                    c._attn_implementation = impl

        return torch.utils.checkpoint.checkpoint(on_forward_backend, *args, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        """Undo ``gradient_checkpointing_enable``."""
        for model in (self.llm, self.vision_tower):
            disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
            disable()
        self.prefusion.checkpoint = None

    # --- generate ------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, images=None, input_ids=None, *, prompts=None, videos=None, prefix: Prefix | None = None,
                 attention_mask=None, generation_config: GenerationConfig | None = None, fps: float = 1.0,
                 max_frames: int | None = None, backend: str | None = None, **generate_kwargs):
        """Encode the inputs, then decode with transformers' ``generate`` from the fused embeddings.

        Inputs as for ``encode`` (``attention_mask`` is that of ``input_ids``). Decoding options
        are transformers' (``generation_config`` and keyword arguments such as ``max_new_tokens``,
        ``do_sample``, ``temperature``, ``top_p``, ``num_beams``, ``repetition_penalty``,
        ``eos_token_id`` (None: never stop), ``use_cache``, ``cache_implementation="static"``,
        ``streamer``, ``stopping_criteria``, ``stop_strings``); unset ones come from
        ``self.llm.generation_config`` (a checkpoint's ``generation_config.json``, else the LLM
        config's special tokens and transformers' defaults: greedy, 20 new tokens). ``stop_strings``
        use ``self.tokenizer`` unless ``tokenizer=`` is given. Sampling draws from torch's global
        generator: seed it with ``torch.manual_seed`` for reproducible samples. As in the released
        code, the prompt is embeddings, so ``repetition_penalty`` sees only the new tokens.

        Returns the new tokens only, [B, n] (the prompt went in as embeddings; ``decode`` gives
        text); finished rows are padded with the pad id. ``return_dict_in_generate=True`` gives
        transformers' output object instead.
        """
        if self.tokenizer is not None:
            generate_kwargs.setdefault("tokenizer", self.tokenizer)
        with self.backend_scope(backend) as name:
            config = generation_config if isinstance(generation_config, GenerationConfig) else self.llm.generation_config
            cache = generate_kwargs.get("cache_implementation", getattr(config, "cache_implementation", None))
            if name == "triton" and isinstance(cache, str) and "static" in cache:  # before any encoding work
                raise ValueError(f"cache_implementation: {cache!r} needs 4-D attention masks; static caches are not "
                                 "supported by the 'triton' attention: use backend='sdpa' (or a dynamic cache)")
            prompt = self.encode(images, input_ids, prompts=prompts, videos=videos, prefix=prefix,
                                 attention_mask=attention_mask, fps=fps, max_frames=max_frames, backend=name)
            length, new = prompt.inputs_embeds.shape[1], self.new_tokens(generation_config, generate_kwargs)
            self.check_context_length(length + new, f"a prompt of {length:,} + {new:,} new tokens")
            return generate(self.llm, prompt, generation_config, **generate_kwargs)

    def new_tokens(self, generation_config: GenerationConfig | None, generate_kwargs: dict) -> int:
        """The most tokens ``generate`` may add: ``max_new_tokens``, else ``max_length`` (from an
        embeddings-only prompt transformers counts new tokens in it), from the keyword arguments, else
        ``generation_config``, else the LLM's."""
        config = generation_config if isinstance(generation_config, GenerationConfig) else self.llm.generation_config
        for name in ("max_new_tokens", "max_length"):
            value = generate_kwargs.get(name, getattr(config, name, None))
            if isinstance(value, int) and value >= 0:  # anything else: transformers' own error follows
                return value
        return 0

    def decode(self, tokens: torch.Tensor) -> list[str]:
        """Token ids [B, n] -> text (needs a tokenizer)."""
        if self.tokenizer is None:
            raise ValueError("decode: no tokenizer (load a checkpoint that has one, or set model.tokenizer)")
        return self.tokenizer.batch_decode(tokens, skip_special_tokens=True)

