"""The one switch that picks how the hot paths run.

Backends:

- ``"torch"``: the reference PyTorch path (the spec). Attention runs as transformers' ``eager``.
- ``"sdpa"``: attention through ``torch.nn.functional.scaled_dot_product_attention``;
  the compressor keeps its reference path.
- ``"triton"``: the fused Triton kernels of this package.
- ``"flash_attn"``: attention through the optional ``flash-attn`` package (only when importable);
  the compressor keeps its reference path.

Precedence, highest first: a per-call override (``use_backend`` / a model call's ``backend=``),
the model's own setting (``LlavaMini.set_backend``), the process default (``set_backend``), the
environment variable ``LLAVA_MINI_BACKEND``, and finally ``"torch"``.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os

BACKENDS = ("torch", "sdpa", "triton", "flash_attn")
ENV_VAR = "LLAVA_MINI_BACKEND"

# The transformers attention implementation each backend runs its decoder layers with.
ATTN_IMPLEMENTATION = {
    "torch": "eager",
    "sdpa": "sdpa",
    "triton": "llava_mini_triton",
    "flash_attn": "flash_attention_2",
}

_default: str | None = None
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("llava_mini_backend", default=None)


def is_available(name: str) -> bool:
    """Whether backend ``name`` can run in this process."""
    if name in ("torch", "sdpa"):
        return True
    if name == "triton":
        return importlib.util.find_spec("triton") is not None
    if name == "flash_attn":
        return importlib.util.find_spec("flash_attn") is not None
    return False


def available_backends() -> list[str]:
    """The backends that can run here, in the order of ``BACKENDS``."""
    return [b for b in BACKENDS if is_available(b)]


def validate(name: str, argument: str = "backend") -> str:
    """Return ``name`` if it is a known, runnable backend; raise a clear error otherwise."""
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{argument}: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    if not is_available(name):
        extra = " (pip install 'llava-mini[flash]')" if name == "flash_attn" else ""
        raise ValueError(f"{argument}: backend {name!r} is not available in this environment{extra}")
    return name


def set_backend(name: str | None) -> None:
    """Set the process-wide default backend (``None`` returns to the environment/default)."""
    global _default
    _default = None if name is None else validate(name)


def get_backend() -> str:
    """The backend in force here: per-call override, process default, environment, ``"torch"``."""
    name = _override.get()
    if name is not None:
        return name
    if _default is not None:
        return _default
    env = os.environ.get(ENV_VAR)
    if env:
        return validate(env, argument=f"environment variable {ENV_VAR}")
    return "torch"


@contextlib.contextmanager
def use_backend(name: str | None):
    """Run a block with backend ``name`` (``None`` leaves the current one in force)."""
    if name is None:
        yield get_backend()
        return
    token = _override.set(validate(name))
    try:
        yield name
    finally:
        _override.reset(token)


def vision_attn_implementation(name: str | None = None) -> str:
    """The attention implementation of a (bidirectional) vision tower under backend ``name``.

    The project's kernels are causal, so vision towers run eager on "torch" and SDPA otherwise.
    """
    name = get_backend() if name is None else validate(name)
    return "eager" if name == "torch" else "sdpa"


def attn_implementation(name: str | None = None) -> str:
    """The transformers ``attn_implementation`` string for backend ``name`` (default: current)."""
    name = get_backend() if name is None else validate(name)
    if name == "triton":
        # Registering the kernel with transformers' AttentionInterface happens on import.
        import llava_mini.kernels.hf  # noqa: F401
    return ATTN_IMPLEMENTATION[name]


@contextlib.contextmanager
def configs_on_backend(name: str, text_config, vision_config=None):
    """Run a block with a model's attention on backend ``name`` (the process switch too).

    The text (causal) config gets ``attn_implementation(name)``, the vision (bidirectional) config
    ``vision_attn_implementation(name)``; both are restored afterwards.
    """
    configs = [(text_config, attn_implementation(name))]
    if vision_config is not None:
        configs.append((vision_config, vision_attn_implementation(name)))
    previous = [c._attn_implementation for c, _ in configs]
    for config, impl in configs:
        config._attn_implementation = impl
    try:
        with use_backend(name):
            yield name
    finally:
        for (config, _), impl in zip(configs, previous):
            config._attn_implementation = impl
