"""The released ``config.json`` (model_type ``llava_mini_llama``) as a transformers config, for vLLM.

vLLM reads configs through ``AutoConfig``, which does not know ``llava_mini_llama``: the plugin
registers ``LlavaMiniLlamaConfig`` for it. It is a ``LlamaConfig`` (the LLM's fields, which vLLM's
Llama reads) that keeps every other field of the file (``mm_*``, ``compressor_size``, ...), from
which ``to_llava_mini_config`` rebuilds this package's ``LlavaMiniConfig``. Importing this module
needs no vLLM.
"""

from __future__ import annotations

from transformers import AutoConfig, LlamaConfig

from llava_mini.lmm.checkpoint import MODEL_TYPE, config_from_json
from llava_mini.lmm.config import LlavaMiniConfig

ARCHITECTURE = "LlavaMiniLlamaForCausalLM"  # the released config.json's "architectures"


class LlavaMiniLlamaConfig(LlamaConfig):
    """LLaVA-Mini's released config: a Llama config plus the vision, compressor and pre-fusion fields."""

    model_type = MODEL_TYPE


def to_llava_mini_config(hf_config) -> LlavaMiniConfig:
    """This package's config from a loaded ``LlavaMiniLlamaConfig`` (the fields of config.json)."""
    d = hf_config.to_dict()
    d["model_type"] = MODEL_TYPE
    return config_from_json(d)


def register_config() -> None:
    """Make ``AutoConfig`` read ``model_type: llava_mini_llama`` (idempotent)."""
    AutoConfig.register(MODEL_TYPE, LlavaMiniLlamaConfig, exist_ok=True)
