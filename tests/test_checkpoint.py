"""Loading and saving the released checkpoint layout (sharded safetensors with an index)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from llava_mini.lmm import IMAGE_TOKEN_INDEX as IMG
from llava_mini.lmm import LlavaMini
from llava_mini.lmm.checkpoint import CLIP_L_336_NAME, INDEX_FILE, config_from_json
from llava_mini.lmm.config import CLIP_VIT_L_336

RELEASED_NAMES = [
    "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.compressor.query", "model.compressor.pos_embed", "model.compressor.attn.in_proj_weight",
    "model.compressor.attn.out_proj.bias", "model.compressor.ln_q.weight", "model.compressor.ln_kv.bias",
    "model.mm_projector.0.weight", "model.mm_projector.2.bias",
    "model.prefusion_layers.1.mlp.down_proj.weight",
    "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight",
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = LlavaMini.from_preset("tiny")
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path, max_shard_bytes=150_000)
    return model, path


def run(model):
    torch.manual_seed(7)
    return model.generate([torch.rand(3, 28, 28)], [[1, 4, IMG, 9]], max_new_tokens=5, eos_token_id=None), \
        model.encode([torch.rand(3, 28, 28)], [[1, 4, IMG, 9]]).inputs_embeds


def shard_tensors(path):
    index = json.loads((path / INDEX_FILE).read_text())["weight_map"]
    return index, {f: load_file(str(path / f)) for f in sorted(set(index.values()))}


def test_layout_is_the_released_one(saved):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llava_mini_llama"
    assert config["compressor_size"] == 1 and config["prefusion_layer_num"] == 2
    assert config["mm_projector_type"] == "mlp2x_gelu" and config["mm_hidden_size"] == 32
    index, shards = shard_tensors(path)
    assert len(shards) > 2  # several shards
    for name in RELEASED_NAMES:
        assert name in index and name in shards[index[name]]


def test_round_trip_reproduces_outputs_bit_for_bit(saved):
    model, path = saved
    loaded = LlavaMini.from_pretrained(path)
    assert loaded.load_report == {"missing": [], "unexpected": [], "misshapen": []}
    for a, b in zip(run(model), run(loaded)):
        assert torch.equal(a, b)


def rewrite(path, tmp_path, edit):
    """Copy a checkpoint, letting ``edit(tensors)`` change its tensors (one shard)."""
    index, shards = shard_tensors(path)
    tensors = {k: v for shard in shards.values() for k, v in shard.items()}
    edit(tensors)
    save_file(tensors, str(tmp_path / "model-00001-of-00001.safetensors"))
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": dict.fromkeys(tensors, "model-00001-of-00001.safetensors")}))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    return tmp_path


def test_missing_key_is_named(saved, tmp_path):
    path = rewrite(saved[1], tmp_path, lambda t: t.pop("model.compressor.query"))
    with pytest.raises(ValueError, match=r"missing keys: model\.compressor\.query"):
        LlavaMini.from_pretrained(path)
    loose = LlavaMini.from_pretrained(path, strict=False)
    assert loose.load_report["missing"] == ["model.compressor.query"]


def test_misshapen_key_is_named_with_both_shapes(saved, tmp_path):
    def edit(t):
        t["model.mm_projector.0.weight"] = torch.zeros(64, 31)
    path = rewrite(saved[1], tmp_path, edit)
    with pytest.raises(ValueError, match=r"model\.mm_projector\.0\.weight: checkpoint \[64, 31\], model \[64, 32\]"):
        LlavaMini.from_pretrained(path)


def test_unexpected_key_is_reported(saved, tmp_path):
    def edit(t):
        t["model.extra_head.weight"] = torch.zeros(2)
        t["model.vision_tower.vision_tower.vision_model.embeddings.position_ids"] = torch.arange(50)[None]
    path = rewrite(saved[1], tmp_path, edit)
    with pytest.warns(UserWarning, match=r"unexpected keys ignored: model\.extra_head\.weight$"):
        model = LlavaMini.from_pretrained(path)
    assert model.load_report["unexpected"] == ["model.extra_head.weight"]


def test_missing_shard_and_bad_directories(saved, tmp_path):
    (tmp_path / "config.json").write_text((saved[1] / "config.json").read_text())
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {"lm_head.weight": "gone.safetensors"}}))
    with pytest.raises(ValueError, match="shard 'gone.safetensors'"):
        LlavaMini.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no config.json"):
        LlavaMini.from_pretrained(tmp_path / "nothing")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type must be 'llava_mini_llama'"):
        LlavaMini.from_pretrained(tmp_path)


def test_released_config_without_our_extras_names_clip_l_336():
    released = {"model_type": "llava_mini_llama", "mm_vision_tower": CLIP_L_336_NAME, "hidden_size": 4096,
                "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0, "compressor_size": 1,
                "prefusion_layer_num": 4, "mm_vision_select_layer": -2, "mm_projector_type": "mlp2x_gelu"}
    config = config_from_json(released)
    assert config.vision == CLIP_VIT_L_336 and config.compressor_heads == 8 and config.template == "llama_3_1"
    assert config.text_config().num_key_value_heads == 8


def test_released_config_fields_and_the_image_processor_round_trip(tmp_path):
    torch.manual_seed(0)
    model = LlavaMini.from_preset("tiny", image_aspect_ratio="square", tokenizer_model_max_length=1234)
    model.image_processor.image_mean = [0.5, 0.25, 0.125]
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["image_aspect_ratio"] == "square" and config["tokenizer_model_max_length"] == 1234
    assert (tmp_path / "preprocessor_config.json").is_file()
    loaded = LlavaMini.from_pretrained(tmp_path)
    assert loaded.config.image_aspect_ratio == "square" and loaded.config.tokenizer_model_max_length == 1234
    assert list(loaded.image_processor.image_mean) == [0.5, 0.25, 0.125]


def test_released_config_defaults_and_unsupported_aspect_ratio():
    released = {"model_type": "llava_mini_llama", "mm_vision_tower": CLIP_L_336_NAME, "hidden_size": 64,
                "num_attention_heads": 4, "vocab_size": 256}
    config = config_from_json(released)
    assert config.image_aspect_ratio == "square"  # no field: the released code runs the processor alone
    assert config.tokenizer_model_max_length is None
    config = config_from_json(dict(released, image_aspect_ratio="pad", tokenizer_model_max_length=2048))
    assert config.image_aspect_ratio == "pad" and config.tokenizer_model_max_length == 2048
    with pytest.raises(ValueError, match="image_aspect_ratio: expected one of"):
        config_from_json(dict(released, image_aspect_ratio="anyres"))


def test_weights_stored_in_float8_load_exactly_and_as_float32_by_default(tmp_path):
    torch.manual_seed(0)
    model = LlavaMini.from_preset("tiny")
    with torch.no_grad():  # values on float8's grid survive the round trip exactly
        for p in model.parameters():
            p.copy_(p.to(torch.float8_e4m3fn).float())
    model.save_pretrained(tmp_path, dtype=torch.float8_e4m3fn)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "float8_e4m3fn"
    loaded = LlavaMini.from_pretrained(tmp_path)
    assert loaded.dtype == torch.float32
    for a, b in zip(run(model), run(loaded)):
        assert torch.equal(a, b)
    assert LlavaMini.from_pretrained(tmp_path, dtype=torch.float64).dtype == torch.float64
