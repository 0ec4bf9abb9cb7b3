"""LLaVA-Mini as a vLLM model: vLLM's own Llama for the LLM, this package's encoder for the rest.

The LLM is vLLM's ``LlamaForCausalLM`` (paged attention, continuous batching, tensor-parallel
shards). CLIP, the compressor, the projector and pre-fusion are ``LlavaMiniEncoder`` (the code
``LlavaMini`` runs, with its backend switch: the fused Triton kernels on a GPU, SDPA on the CPU;
``LLAVA_MINI_BACKEND`` overrides), run once per item in ``embed_multimodal``. Each item's rows are
the whole prompt's LLM input (see ``processor``): vLLM caches them by the item's hash and hands
each prefill chunk its slice.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.models.interfaces import SupportsMultiModal
from vllm.model_executor.models.utils import init_vllm_registered_model, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY

from llava_mini.kernels import backend as backends
from llava_mini.lmm import processing
from llava_mini.lmm.checkpoint import IGNORABLE_SUFFIXES, from_released, released_shapes
from llava_mini.lmm.model import LlavaMiniEncoder
from llava_mini.serving.config import to_llava_mini_config
from llava_mini.serving.processor import (
    IDS_FIELD,
    IMAGE_FIELD,
    VIDEO_FIELD,
    LlavaMiniDummyInputsBuilder,
    LlavaMiniMultiModalProcessor,
    LlavaMiniProcessingInfo,
)


def default_backend(device: torch.device) -> str | None:
    """The encoder's backend: ``LLAVA_MINI_BACKEND`` when set, else the fused kernels on CUDA, SDPA elsewhere."""
    if os.environ.get(backends.ENV_VAR):
        return None  # the environment variable decides (backend precedence)
    return "triton" if device.type == "cuda" else "sdpa"


@MULTIMODAL_REGISTRY.register_processor(LlavaMiniMultiModalProcessor, info=LlavaMiniProcessingInfo,
                                        dummy_inputs=LlavaMiniDummyInputsBuilder)
class LlavaMiniLlamaForCausalLM(nn.Module, SupportsMultiModal):
    """The released architecture ``LlavaMiniLlamaForCausalLM`` in vLLM (images, HD, video, text)."""

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality in ("image", "video"):  # the released prompts mark a video with <image> too
            return processing.IMAGE_PLACEHOLDER
        raise ValueError(f"modality: LLaVA-Mini takes images and videos, not {modality!r}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        hf_config = vllm_config.model_config.hf_config
        self.mini_config = to_llava_mini_config(hf_config)
        text_config = self.mini_config.text_config()
        text_config._attn_implementation = "sdpa"  # set per call by the backend switch
        with self._mark_tower_model(vllm_config, {"image", "video"}):
            self.encoder = LlavaMiniEncoder(self.mini_config, text_config)
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config, hf_config=hf_config, architectures=["LlamaForCausalLM"],
                prefix=maybe_prefix(prefix, "language_model"))
        # Pre-fusion's text rows are the LLM's own token embeddings (vLLM's, sharded under TP).
        self.encoder._embed_tokens = self.language_model.embed_input_ids
        self.encoder.set_backend(default_backend(torch.device(vllm_config.device_config.device)))
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    def embed_multimodal(self, **kwargs: object) -> list[torch.Tensor]:
        """Each item's rows of the LLM input: the fused prompt with its vision tokens, [span, d]."""
        ids = kwargs.get(IDS_FIELD)
        if ids is None:
            return []
        ids = [row.tolist() for row in ids]
        if kwargs.get(IMAGE_FIELD) is not None:
            pixels = kwargs[IMAGE_FIELD]
            pixels = torch.stack(list(pixels)) if isinstance(pixels, (list, tuple)) else pixels
            return self.encoder.llm_rows(images=pixels, input_ids=ids)  # a batch: right-padded, exact
        return [self.encoder.llm_rows(videos=[video], input_ids=[row])[0]
                for video, row in zip(kwargs[VIDEO_FIELD], ids)]

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None, **kwargs: object):
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load the released keys: the encoder's here, the LLM's through vLLM's Llama (which shards
        them). An unknown key, a key of the wrong shape or a missing key raises, naming it."""
        expected = released_shapes(self.mini_config)
        if self.mini_config.text.get("tie_word_embeddings"):
            expected.pop("lm_head.weight", None)
        ours = self.encoder.state_dict(keep_vars=True)
        seen, loaded = set(), set()

        def llm_weights():  # streamed: the LLM's tensors go on to vLLM's loader one at a time
            for name, tensor in weights:
                if name not in expected:
                    if name.endswith(IGNORABLE_SUFFIXES):
                        continue
                    raise ValueError(f"checkpoint: unexpected key {name} (not in the released LLaVA-Mini layout "
                                     f"of this config)")
                if tuple(tensor.shape) != expected[name]:
                    raise ValueError(f"checkpoint: key {name} has shape {list(tensor.shape)}, the config expects "
                                     f"{list(expected[name])}")
                seen.add(name)
                mine = from_released(name, ours)
                if mine is None:
                    yield name, tensor
                    continue
                with torch.no_grad():
                    ours[mine].copy_(tensor)
                loaded.add(f"encoder.{mine}")

        loaded |= {f"language_model.{n}" for n in self.language_model.load_weights(llm_weights())}
        missing = sorted(set(expected) - seen)
        if missing:
            raise ValueError(f"checkpoint: missing keys: {', '.join(missing)}")
        return loaded
