"""The released conversation templates as chat templates (Jinja), one per ``LlavaMiniConfig.template``."""

from __future__ import annotations

import json
from pathlib import Path

from llava_mini.lmm.checkpoint import config_from_json

TEMPLATES_DIR = Path(__file__).parent


def template_path(template: str) -> Path:
    """The chat template file of a released conversation template (``vicuna_v1``, ``llama_3_1``, ``plain``)."""
    path = TEMPLATES_DIR / f"{template}.jinja"
    if not path.is_file():
        raise ValueError(f"template: no chat template for {template!r}")
    return path


def template_path_for(checkpoint) -> Path | None:
    """The chat template of a checkpoint directory in the released layout (from its config.json)."""
    config = Path(checkpoint) / "config.json"
    if not config.is_file():
        return None
    return template_path(config_from_json(json.loads(config.read_text())).template)
