"""The vLLM model's weight loading from the released keys (no engine: the loader alone, with a
stand-in for vLLM's Llama that records what it is handed)."""

import pytest
import torch
from torch import nn

from serving_common import needs_vllm, write_serve_checkpoint

pytestmark = [needs_vllm]


class RecordingLLM(nn.Module):
    """Takes the LLM's weights as vLLM's Llama would, and reports their names as loaded."""

    def load_weights(self, weights):
        self.received = dict(weights)
        return set(self.received)


@pytest.fixture(scope="module")
def tensors(tmp_path_factory):
    from llava_mini.lmm.checkpoint import read_tensors

    path = write_serve_checkpoint(tmp_path_factory.mktemp("ckpt"))
    return path, read_tensors(path)


def loader(path):
    from llava_mini.lmm.checkpoint import config_from_json
    from llava_mini.lmm.model import LlavaMiniEncoder
    from llava_mini.serving.model import LlavaMiniLlamaForCausalLM

    config = config_from_json(__import__("json").loads((path / "config.json").read_text()))
    model = LlavaMiniLlamaForCausalLM.__new__(LlavaMiniLlamaForCausalLM)  # without vLLM's config and engine
    nn.Module.__init__(model)
    model.mini_config = config
    model.encoder = LlavaMiniEncoder(config, config.text_config())
    model.language_model = RecordingLLM()
    return model


def test_released_keys_reach_the_encoder_and_the_llm(tensors):
    path, weights = tensors
    model = loader(path)
    loaded = model.load_weights(iter(weights.items()))
    encoder_state = model.encoder.state_dict()
    assert {f"encoder.{k}" for k in encoder_state} <= loaded
    assert torch.equal(encoder_state["compressor.query"], weights["model.compressor.query"])
    assert torch.equal(encoder_state["prefusion.layers.1.mlp.down_proj.weight"],
                       weights["model.prefusion_layers.1.mlp.down_proj.weight"])
    # the LLM gets exactly the Llama keys, under the names vLLM's Llama reads
    llm_keys = {k for k in weights if k.startswith("lm_head.") or (k.startswith("model.") and not k.startswith(
        ("model.compressor.", "model.mm_projector.", "model.prefusion_layers.", "model.vision_tower.")))}
    assert set(model.language_model.received) == llm_keys and "model.layers.0.self_attn.q_proj.weight" in llm_keys


@pytest.mark.parametrize("edit, message", [
    (lambda w: w.pop("model.compressor.query"), r"missing keys: model\.compressor\.query"),
    (lambda w: w.pop("model.norm.weight"), r"missing keys: model\.norm\.weight"),
    (lambda w: w.update({"model.mm_projector.0.bias": torch.zeros(3)}),
     r"model\.mm_projector\.0\.bias has shape \[3\], the config expects \[128\]"),
    (lambda w: w.update({"model.prefusion_layers.7.mlp.up_proj.weight": torch.zeros(1)}),
     r"unexpected key model\.prefusion_layers\.7\.mlp\.up_proj\.weight"),
])
def test_bad_checkpoints_are_named(tensors, edit, message):
    path, weights = tensors
    weights = dict(weights)
    edit(weights)
    with pytest.raises(ValueError, match=message):
        loader(path).load_weights(iter(weights.items()))
