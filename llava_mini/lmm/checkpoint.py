"""The released checkpoint layout (``ICTNLP/llava-mini-*``) on a local directory.

``config.json`` (model_type ``llava_mini_llama``: the Llama fields plus ``mm_*``, ``compressor_size``,
``prefusion_layer_num``, ``resolution_ratio``, ``image_aspect_ratio``, ``tokenizer_model_max_length``),
an optional ``preprocessor_config.json`` (the CLIP image processor) and safetensors shards with a
``model.safetensors.index.json``. Keys:
``model.*`` / ``lm_head.*`` (Llama), ``model.mm_projector.{0,2}.*``, ``model.compressor.*``,
``model.prefusion_layers.{i}.*`` and ``model.vision_tower.vision_tower.vision_model.*`` (CLIP).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import GenerationConfig

from llava_mini.lmm import processing
from llava_mini.lmm.config import CLIP_VIT_L_336, LlavaMiniConfig

MODEL_TYPE = "llava_mini_llama"
CLIP_L_336_NAME = "openai/clip-vit-large-patch14-336"
INDEX_FILE = "model.safetensors.index.json"

# (our state-dict prefix, released prefix); longest first so the mapping is unambiguous.
# CLIPVisionModel's own keys start with "vision_model." in some transformers 5.x releases and not
# in others; both map onto the released "...vision_tower.vision_model." names.
KEY_PREFIXES = [
    ("vision_tower.vision_model.", "model.vision_tower.vision_tower.vision_model."),
    ("vision_tower.", "model.vision_tower.vision_tower.vision_model."),
    ("prefusion.layers.", "model.prefusion_layers."),
    ("mm_projector.", "model.mm_projector."),
    ("compressor.", "model.compressor."),
    ("llm.lm_head.", "lm_head."),
    ("llm.model.", "model."),
]
TEXT_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "vocab_size", "rms_norm_eps", "max_position_embeddings", "rope_theta", "rope_scaling", "bos_token_id",
             "eos_token_id", "pad_token_id", "hidden_act", "tie_word_embeddings", "attention_bias", "mlp_bias",
             "head_dim")
COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Buffers some releases store that this model recomputes.
IGNORABLE_SUFFIXES = ("position_ids", "rotary_emb.inv_freq")


def to_released(name: str) -> str:
    for ours, released in KEY_PREFIXES:
        if name.startswith(ours):
            return released + name[len(ours):]
    raise KeyError(f"no released name for parameter {name!r}")


def from_released(name: str, ours_keys) -> str | None:
    """Our name for released key ``name`` among ``ours_keys``, or None."""
    for ours, released in KEY_PREFIXES:  # the vision/prefusion prefixes are checked before plain "model."
        if name.startswith(released) and ours + name[len(released):] in ours_keys:
            return ours + name[len(released):]
    return None


def released_shapes(config: LlavaMiniConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a released-layout checkpoint of ``config`` holds: {released key: shape}
    (from a model built on the meta device: no memory, no initialisation)."""
    from llava_mini.lmm.model import LlavaMini

    with torch.device("meta"):
        model = LlavaMini(config)
    return {to_released(k): tuple(v.shape) for k, v in model.state_dict().items()}


def config_to_json(config: LlavaMiniConfig, dtype: torch.dtype) -> dict:
    text = config.text_config()
    out = {k: getattr(text, k) for k in TEXT_KEYS if getattr(text, k, None) is not None}
    rope = getattr(text, "rope_parameters", None) or {}
    out["rope_theta"] = rope.get("rope_theta", out.get("rope_theta"))
    if rope.get("rope_type", "default") != "default":
        out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    out.update(
        model_type=MODEL_TYPE, architectures=["LlavaMiniLlamaForCausalLM"],
        mm_vision_tower=CLIP_L_336_NAME if config.vision == CLIP_VIT_L_336 else "custom",
        mm_hidden_size=config.vision["hidden_size"], mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=config.vision_feature_layer, mm_vision_select_feature="patch",
        compressor_size=config.compressor_size, prefusion_layer_num=config.prefusion_layers,
        resolution_ratio=config.resolution_ratio, image_aspect_ratio=config.image_aspect_ratio,
        torch_dtype=str(dtype).removeprefix("torch."),
        # Not in the release (it names a hub CLIP and fixes 8 heads); written so any config round-trips.
        llava_mini_vision_config=config.vision, compressor_heads=config.compressor_heads,
        llava_mini_template=config.template, llava_mini_name=config.name,
    )
    if config.tokenizer_model_max_length is not None:
        out["tokenizer_model_max_length"] = config.tokenizer_model_max_length
    return out


def config_from_json(d: dict) -> LlavaMiniConfig:
    if d.get("model_type") != MODEL_TYPE:
        raise ValueError(f"config.json: model_type must be {MODEL_TYPE!r}, got {d.get('model_type')!r}")
    vision = d.get("llava_mini_vision_config")
    if vision is None:
        if "clip-vit-large-patch14-336" not in str(d.get("mm_vision_tower", "")):
            raise ValueError(f"config.json: unknown vision tower {d.get('mm_vision_tower')!r}; "
                             f"expected {CLIP_L_336_NAME} or a 'llava_mini_vision_config' entry")
        vision = dict(CLIP_VIT_L_336)
    if d.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ValueError(f"config.json: mm_projector_type {d['mm_projector_type']!r} is not supported (mlp2x_gelu)")
    text = {k: d[k] for k in TEXT_KEYS if d.get(k) is not None}
    rope = d.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" not in text:  # a transformers 5 config's to_dict()
        text["rope_theta"] = rope.get("rope_theta")
        if rope.get("rope_type", "default") != "default":
            text["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    template = d.get("llava_mini_template") or ("llama_3_1" if text.get("vocab_size", 0) >= 128000 else "vicuna_v1")
    return LlavaMiniConfig(
        vision=vision, text=text, compressor_size=d.get("compressor_size", 1),
        compressor_heads=d.get("compressor_heads", 8), prefusion_layers=d.get("prefusion_layer_num", 4),
        resolution_ratio=d.get("resolution_ratio", 1), vision_feature_layer=d.get("mm_vision_select_layer", -2),
        template=template, name=d.get("llava_mini_name", Path(d.get("_name_or_path", "checkpoint")).name),
        # Released code: a config without image_aspect_ratio runs the CLIP processor alone (no padding).
        image_aspect_ratio=d.get("image_aspect_ratio") or "square",
        tokenizer_model_max_length=d.get("tokenizer_model_max_length"),
    )


def save_pretrained(model, path, max_shard_bytes: int = 2 << 30, dtype: torch.dtype | None = None) -> None:
    """Write ``model`` in the released layout: config.json, shards, index, the image processor's
    preprocessor_config.json (and the tokenizer, if any). ``dtype`` stores the weights in another
    dtype (default: the model's)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = dtype or model.dtype
    tensors = {to_released(k): (v.to(dtype) if v.is_floating_point() else v).detach().contiguous()
               for k, v in model.state_dict().items()}
    shards: list[dict] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: v.cpu() for k, v in shard.items()}, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (path / "config.json").write_text(json.dumps(config_to_json(model.config, dtype), indent=2))
    model.image_processor.save_pretrained(str(path))
    model.llm.generation_config.save_pretrained(str(path))  # generate's defaults
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(path))


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (sharded with an index, or one model.safetensors)."""
    if (path / INDEX_FILE).is_file():
        weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ValueError(f"path: {str(path)!r} has neither {INDEX_FILE} nor model.safetensors")
    tensors = {}
    for file in files:
        if not (path / file).is_file():
            raise ValueError(f"path: shard {file!r} named by the index is missing from {str(path)!r}")
        with safe_open(str(path / file), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def load_pretrained(cls, path, dtype=None, device=None, strict: bool = True):
    """Build a ``cls`` (LlavaMini) from a local released-layout directory; see the module docstring.

    Missing keys and keys of the wrong shape raise a ValueError naming them (unless ``strict=False``,
    which leaves those parameters as initialised); unexpected keys are reported with a warning.
    The report is kept on ``model.load_report``.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"path: {str(path)!r} is not a checkpoint directory (no config.json)")
    d = json.loads((path / "config.json").read_text())
    config = config_from_json(d)
    stored = getattr(torch, d.get("torch_dtype") or "float32")
    # Weights stored in a dtype the model cannot compute in (e.g. float8) load as float32 by default.
    dtype = dtype or (stored if stored in COMPUTE_DTYPES else torch.float32)
    model = cls.from_config(config, dtype=dtype, device=device)
    expected = model.state_dict()
    loaded, unexpected, misshapen = {}, [], []
    for key, tensor in read_tensors(path).items():
        ours = from_released(key, expected)
        if ours is None:
            if not key.endswith(IGNORABLE_SUFFIXES):
                unexpected.append(key)
            continue
        if tuple(tensor.shape) != tuple(expected[ours].shape):
            misshapen.append(f"{key}: checkpoint {list(tensor.shape)}, model {list(expected[ours].shape)}")
            continue
        loaded[ours] = tensor
    missing = [to_released(k) for k in expected if k not in loaded]
    problems = ([f"missing keys: {', '.join(missing)}"] if missing else []) + \
        ([f"keys of the wrong shape: {'; '.join(misshapen)}"] if misshapen else [])
    if problems and strict:
        raise ValueError(f"checkpoint {str(path)!r}: " + " | ".join(problems))
    if unexpected:
        warnings.warn(f"checkpoint {str(path)!r}: unexpected keys ignored: {', '.join(unexpected)}")
    model.load_state_dict(loaded, strict=False)
    model.image_processor = processing.clip_image_processor(config.crop_size, path)
    model.load_report = {"missing": missing, "unexpected": unexpected, "misshapen": misshapen}
    if (path / "generation_config.json").is_file():  # generate's defaults, as released
        model.llm.generation_config = GenerationConfig.from_pretrained(str(path))
    if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        from transformers import AutoTokenizer

        model.tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model
