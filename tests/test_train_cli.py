"""A model that learns: a short seeded run of the released two-stage recipe on the colour task
(``llava_mini.training``), its checkpoints, and ``llava-mini train``."""

import importlib.util

import pytest
import torch

from llava_mini.cli import main
from llava_mini.lmm import LlavaMini
from llava_mini.training import COLOURS, TrainConfig, evaluate, train
from llava_mini.training.task import ColourTask

# 4 colours: chance is 25%. With seed 0, 30 + 120 steps of 16 examples reach 100% on the 64
# held-out examples on this machine's CPU; 80% leaves room for another CPU's rounding.
STEPS, REQUIRED = (30, 120), 0.8


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    torch.manual_seed(0)
    return train(TrainConfig(preset="tiny", steps=STEPS, batch_size=16, lr=3e-3, seed=0, out=str(out),
                             backend="torch", progress=False))


def test_held_out_accuracy_rises_well_above_chance(trained):
    acc = trained["accuracy"]
    assert trained["chance"] == 1 / len(COLOURS) == 0.25
    assert acc["start"] <= 0.5  # a random model does not already know the answers
    assert acc["finetune"] >= REQUIRED, acc


def test_checkpoint_loads_and_gives_the_trained_model(trained):
    model = trained["model"]
    loaded = LlavaMini.from_pretrained(trained["checkpoints"]["finetune"])
    assert loaded.tokenizer is not None and loaded.load_report is not None
    batch = ColourTask(model, seed=123).batch(8)
    with torch.no_grad():
        want = model(images=batch.pixels, input_ids=batch.input_ids).logits
        got = loaded(images=batch.pixels, input_ids=batch.input_ids).logits
    assert torch.equal(got, want)  # a bit-exact round trip
    assert evaluate(loaded, batch) == evaluate(model, batch)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (the plugin's weight loader)")
def test_checkpoint_loads_in_the_vllm_plugin_weight_loader(trained):
    import json
    from pathlib import Path

    from torch import nn

    from llava_mini.lmm.checkpoint import config_from_json, read_tensors
    from llava_mini.lmm.model import LlavaMiniEncoder
    from llava_mini.serving.model import LlavaMiniLlamaForCausalLM

    class RecordingLLM(nn.Module):  # stands in for vLLM's Llama (no engine)
        def load_weights(self, weights):
            self.received = dict(weights)
            return set(self.received)

    path = Path(trained["checkpoints"]["finetune"])
    config = config_from_json(json.loads((path / "config.json").read_text()))
    plugin = LlavaMiniLlamaForCausalLM.__new__(LlavaMiniLlamaForCausalLM)
    nn.Module.__init__(plugin)
    plugin.mini_config = config
    plugin.encoder = LlavaMiniEncoder(config, config.text_config())
    plugin.language_model = RecordingLLM()
    loaded = plugin.load_weights(iter(read_tensors(path).items()))
    trained_state = trained["model"].state_dict()
    for key, value in plugin.encoder.state_dict().items():
        assert f"encoder.{key}" in loaded
        assert torch.equal(value, trained_state[key]), key
    assert torch.equal(plugin.language_model.received["lm_head.weight"], trained_state["llm.lm_head.weight"])


def test_train_cli_runs_both_stages_and_saves_them(tmp_path, capsys):
    assert main(["train", "--steps", "1", "1", "--batch-size", "2", "--eval-size", "4", "--out", str(tmp_path),
                 "--no-progress", "--gradient-checkpointing"]) == 0
    out = capsys.readouterr().out
    assert "held-out accuracy (chance 25%)" in out and "after finetune" in out
    for stage in ("pretrain", "finetune"):
        assert (tmp_path / stage / "config.json").is_file() and (tmp_path / stage / "tokenizer.json").is_file()


def test_train_cli_refuses_bad_steps(capsys):
    assert main(["train", "--steps", "-1", "1", "--no-progress"]) == 2
    assert "steps" in capsys.readouterr().err
