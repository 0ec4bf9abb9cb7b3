"""LLaVA-Mini configuration and named presets."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from transformers import CLIPVisionConfig, LlamaConfig

IMAGE_TOKEN_INDEX = -200  # the released code's `<image>` placeholder id
IGNORE_INDEX = -100  # labels where no loss is taken (the released code's, and transformers' cross-entropy default)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TEMPLATES = ("vicuna_v1", "llama_3_1", "plain")
ASPECT_RATIOS = ("pad", "square")  # the released config's image_aspect_ratio values LLaVA-Mini uses

CLIP_VIT_L_336 = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
)
VICUNA_7B = dict(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, vocab_size=32000, rms_norm_eps=1e-5, max_position_embeddings=4096,
    rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0, hidden_act="silu",
    tie_word_embeddings=False,
)
LLAMA_31_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, rms_norm_eps=1e-5, max_position_embeddings=131072,
    rope_theta=500000.0, bos_token_id=128000, eos_token_id=[128001, 128008, 128009], pad_token_id=None,
    hidden_act="silu", tie_word_embeddings=False,
    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192),
)
# Scaled down for CPU benchmarks: the real token counts (576 per image), narrow layers.
SMALL_VISION = dict(
    hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
    image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=128,
)
SMALL_TEXT = dict(
    hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
    num_key_value_heads=8, vocab_size=32000, rms_norm_eps=1e-5, max_position_embeddings=4096,
    rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0, hidden_act="silu",
    tie_word_embeddings=False,
)
TINY_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    image_size=28, patch_size=4, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=16,
)
TINY_TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=256, rms_norm_eps=1e-5, max_position_embeddings=2048,
    rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0, hidden_act="silu",
    tie_word_embeddings=False,
)


@dataclasses.dataclass
class LlavaMiniConfig:
    """Everything that shapes a LLaVA-Mini model.

    Presets: ``tiny`` and ``tiny-hd`` (tests), ``small`` (CPU benchmarks: 576 tokens per image,
    narrow layers), and the released shapes ``llava-mini-vicuna-7b``, ``llava-mini-llama-3.1-8b``,
    ``llava-mini-hd-vicuna-7b``.

    Args:
        vision: keyword arguments of the CLIP ``CLIPVisionConfig`` (the vision tower).
        text: keyword arguments of the ``LlamaConfig`` (LLM and pre-fusion layers).
        compressor_size: C; the compressor emits C x C tokens per image (1 for LLaVA-Mini).
        compressor_heads: attention heads of the compressor (8 in the release).
        prefusion_layers: number of pre-fusion decoder layers (0 disables pre-fusion).
        resolution_ratio: 1 for 336 px; 2 for the HD model (2x2 crops plus the global view).
        vision_feature_layer: which CLIP hidden state feeds the model (-2 in the release).
        template: conversation template for text prompts (``vicuna_v1``, ``llama_3_1``, ``plain``).
        image_aspect_ratio: ``"pad"`` pads each image (and each HD block) to a square with the CLIP
            mean colour before the CLIP processor, as the released configs ask; ``"square"`` runs the
            processor alone (what the released code does when a config lacks the field).
        tokenizer_model_max_length: when set (released configs carry it), the LLM input of each
            prompt is cut to this many positions, as released; ``encode`` warns when it cuts.
        name: the preset name, for reports.
    """

    vision: dict
    text: dict
    compressor_size: int = 1
    compressor_heads: int = 8
    prefusion_layers: int = 4
    resolution_ratio: int = 1
    vision_feature_layer: int = -2
    template: str = "vicuna_v1"
    image_aspect_ratio: str = "pad"
    tokenizer_model_max_length: int | None = None
    name: str = "custom"

    def __post_init__(self):
        for field in ("compressor_size", "compressor_heads", "resolution_ratio"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{field}: expected a positive int, got {value!r}")
        if not isinstance(self.prefusion_layers, int) or self.prefusion_layers < 0:
            raise ValueError(f"prefusion_layers: expected an int >= 0, got {self.prefusion_layers!r}")
        if self.vision["hidden_size"] % self.compressor_heads:
            raise ValueError(
                f"compressor_heads: {self.compressor_heads} does not divide the vision width "
                f"{self.vision['hidden_size']}")
        if self.template not in TEMPLATES:
            raise ValueError(f"template: expected one of {TEMPLATES}, got {self.template!r}")
        if self.image_aspect_ratio not in ASPECT_RATIOS:
            raise ValueError(f"image_aspect_ratio: expected one of {ASPECT_RATIOS}, got {self.image_aspect_ratio!r}")
        max_len = self.tokenizer_model_max_length
        if max_len is not None and (not isinstance(max_len, int) or max_len < 1):
            raise ValueError(f"tokenizer_model_max_length: expected a positive int or None, got {max_len!r}")
        layers = self.vision["num_hidden_layers"]
        if not -layers - 1 <= self.vision_feature_layer <= layers:
            raise ValueError(f"vision_feature_layer: {self.vision_feature_layer} out of range for {layers} layers")

    # --- derived sizes -------------------------------------------------------------------------
    @property
    def crop_size(self) -> int:
        """Side of one CLIP input crop in pixels (336 for the release)."""
        return self.vision["image_size"]

    @property
    def image_size(self) -> int:
        """Side of the model's input image in pixels (crop size x resolution ratio)."""
        return self.crop_size * self.resolution_ratio

    @property
    def grid(self) -> int:
        """Patches per side of one crop (24 for CLIP ViT-L/14-336)."""
        return self.crop_size // self.vision["patch_size"]

    @property
    def crops_per_image(self) -> int:
        """CLIP inputs per image or video frame: 1, or for HD (ratio r > 1) r x r blocks plus the whole."""
        r = self.resolution_ratio
        return r * r + 1 if r > 1 else 1

    @property
    def num_patches(self) -> int:
        """CLIP tokens per crop (576 for the release)."""
        return self.grid ** 2

    @property
    def tokens_per_image(self) -> int:
        """Vision tokens the LLM receives per image (C x C)."""
        return self.compressor_size ** 2

    def vision_config(self) -> CLIPVisionConfig:
        return CLIPVisionConfig(**self.vision)

    def text_config(self) -> LlamaConfig:
        return LlamaConfig(**copy.deepcopy(self.text))

    # --- presets and (de)serialisation -----------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "LlavaMiniConfig":
        """A named preset (see ``LlavaMiniConfig.presets()``), with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"preset: unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
        fields = copy.deepcopy(PRESETS[name])
        fields.update(overrides)
        fields.setdefault("name", name)
        return cls(**fields)

    @staticmethod
    def presets() -> list[str]:
        """Names accepted by ``from_preset``."""
        return list(PRESETS)

    def to_dict(self) -> dict:
        return copy.deepcopy(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> "LlavaMiniConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"config: unknown fields {sorted(unknown)}")
        return cls(**copy.deepcopy(d))


PRESETS: dict[str, dict] = {
    "tiny": dict(vision=TINY_VISION, text=TINY_TEXT, compressor_size=1, compressor_heads=4,
                 prefusion_layers=2),
    "tiny-hd": dict(vision=TINY_VISION, text=TINY_TEXT, compressor_size=2, compressor_heads=4,
                    prefusion_layers=2, resolution_ratio=2),
    "small": dict(vision=SMALL_VISION, text=SMALL_TEXT, compressor_size=1, prefusion_layers=2),
    "llava-mini-vicuna-7b": dict(vision=CLIP_VIT_L_336, text=VICUNA_7B, compressor_size=1),
    "llava-mini-llama-3.1-8b": dict(vision=CLIP_VIT_L_336, text=LLAMA_31_8B, compressor_size=1,
                                    template="llama_3_1"),
    "llava-mini-hd-vicuna-7b": dict(vision=CLIP_VIT_L_336, text=VICUNA_7B, compressor_size=8,
                                    resolution_ratio=2),
}
