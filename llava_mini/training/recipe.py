"""The released two-stage recipe (pretraining, then instruction tuning) on the colour task.

Stage ``pretrain`` trains the compressor, the projector and the pre-fusion layers with the vision
tower and the LLM frozen; stage ``finetune`` trains the LLM too (the vision tower stays frozen). As
in the released scripts: AdamW, no weight decay, a linear warm-up over the first 3% of the steps
then a cosine decay to zero, gradients clipped to norm 1 (transformers' Trainer default). The
released learning rates are 1e-3 (pretraining) and 2e-5 (instruction tuning of a pretrained
Vicuna); a randomly initialised tiny LLM learns nothing in a few hundred steps at 2e-5, so the
default here is 3e-3 for both (``--lr`` sets both): with 50 + 250 steps of 16 examples the `tiny`
preset answers every held-out example (seed 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llava_mini.lmm import LlavaMini, LlavaMiniConfig
from llava_mini.training.task import COLOURS, ColourTask

# What each stage trains (module names of LlavaMini); everything else is frozen.
STAGES = {
    "pretrain": ("compressor", "mm_projector", "prefusion"),
    "finetune": ("compressor", "mm_projector", "prefusion", "llm"),
}
WARMUP_RATIO = 0.03
MAX_GRAD_NORM = 1.0


@dataclass
class TrainConfig:
    """``llava-mini train``'s options."""

    preset: str = "tiny"
    steps: tuple[int, int] = (50, 250)  # pretrain, finetune
    batch_size: int = 16
    lr: float = 3e-3
    seed: int = 0
    out: str | None = None  # checkpoints: <out>/pretrain, <out>/finetune
    backend: str | None = None
    eval_size: int = 64
    gradient_checkpointing: bool = False
    progress: bool = True
    history: list = field(default_factory=list)


def build_model(preset: str, seed: int) -> LlavaMini:
    """A random ``preset`` model with a byte-level tokenizer (the vocabulary widened to hold it)."""
    from llava_mini.serving.synthetic import byte_tokenizer
    from llava_mini.serving.templates import template_path

    config = LlavaMiniConfig.from_preset(preset)
    if config.text["vocab_size"] < 259:  # 3 specials + 256 bytes
        config = LlavaMiniConfig.from_preset(preset, text={**config.text, "vocab_size": 512})
    torch.manual_seed(seed)
    model = LlavaMini.from_config(config, dtype=torch.float32)
    model.tokenizer = byte_tokenizer(config.text["vocab_size"])
    model.tokenizer.chat_template = template_path(config.template).read_text()
    return model


def freeze_for(model: LlavaMini, stage: str) -> list[torch.nn.Parameter]:
    """Set requires_grad as ``stage`` trains; returns the trainable parameters."""
    if stage not in STAGES:
        raise ValueError(f"stage: expected one of {', '.join(STAGES)}, got {stage!r}")
    model.requires_grad_(False)
    for name in STAGES[stage]:
        getattr(model, name).requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def lr_at(step: int, total: int) -> float:
    """The released schedule's factor: linear warm-up over WARMUP_RATIO of the steps, then cosine to 0."""
    warmup = math.ceil(WARMUP_RATIO * total)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def evaluate(model: LlavaMini, batch, backend: str | None = None) -> float:
    """Held-out accuracy: the share of examples whose whole answer greedy decoding reproduces (the
    argmax at every answer position, teacher-forced, is the answer's token)."""
    was_training = model.training
    model.eval()
    out = model(images=batch.pixels, input_ids=batch.input_ids, backend=backend)
    model.train(was_training)
    correct = 0
    c2 = model.config.tokens_per_image
    for i, (ids, labels) in enumerate(zip(batch.input_ids, batch.labels)):
        length = len(ids) - 1 + c2
        answer = [t for t in labels if t >= 0]
        pred = out.logits[i, length - len(answer) - 1:length - 1].argmax(-1).tolist()
        correct += pred == answer
    return correct / len(batch.input_ids)


def train(config: TrainConfig) -> dict:
    """Train ``config.preset`` on the colour task, both stages; save each stage's checkpoint.

    Returns the held-out accuracy before training and after each stage, the chance level, the
    last losses and the checkpoint paths.
    """
    if len(config.steps) != 2 or min(config.steps) < 0:
        raise ValueError(f"steps: expected two step counts >= 0 (pretrain, finetune), got {config.steps}")
    if config.batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {config.batch_size}")
    model = build_model(config.preset, config.seed)
    if config.backend is not None:
        model.set_backend(config.backend)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    data = ColourTask(model, seed=config.seed)
    held_out = ColourTask(model, seed=config.seed + 10_000).batch(config.eval_size)
    result = {"chance": 1 / len(COLOURS), "accuracy": {"start": evaluate(model, held_out)}, "loss": {},
              "checkpoints": {}}
    for stage, steps in zip(STAGES, config.steps):
        params = freeze_for(model, stage)
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s, n=steps: lr_at(s, n))
        model.train()
        bar = progress(range(steps), config.progress, stage)
        loss = None
        for _ in bar:
            batch = data.batch(config.batch_size)
            loss = model(images=batch.pixels, input_ids=batch.input_ids, labels=batch.labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            schedule.step()
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss.item():.3f}")
        model.eval()
        result["accuracy"][stage] = evaluate(model, held_out)
        result["loss"][stage] = None if loss is None else loss.item()
        if config.out is not None:
            path = Path(config.out) / stage
            model.save_pretrained(path)
            result["checkpoints"][stage] = str(path)
    result["model"] = model
    return result


def progress(steps, enabled: bool, stage: str):
    """A tqdm bar over ``steps`` (tqdm comes with transformers); the plain range without it."""
    if not enabled:
        return steps
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return steps
    return tqdm(steps, desc=stage, unit="step")
