"""Test-wide set-up: on a machine without CUDA, Triton kernels run under the interpreter.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set here,
before the tests import llava_mini.
"""

import os
import sys
import warnings

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running; deselect with -m 'not slow'")
    config.addinivalue_line("markers", "vllm: runs vLLM engines or servers (skipped without vLLM); -m 'not vllm' leaves them out")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    """The device kernels run on: CUDA when present, else the CPU (Triton interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def tiny_tokenizer():
    """A factory: ``tiny_tokenizer(vocab_size)`` builds, offline, a tokenizer covering a tiny model's
    whole vocabulary (id i >= 10 decodes to the word ``t{i}``), so any generated id has text.

    BPE on single letters (no merges) for ``a``..``f``: transformers' stop-string matching
    tokenizes a probe string ("abcdef") to learn how tokens join into text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    def build(vocab_size: int):
        vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "\u2581": 3, **{c: 4 + i for i, c in enumerate("abcdef")}}
        vocab.update({f"\u2581t{i}": i for i in range(len(vocab), vocab_size)})
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<pad>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")

    return build


LIBRARY_DIRS = tuple({os.path.dirname(os.path.dirname(warnings.__file__)), os.path.dirname(os.path.dirname(torch.__file__))})


def deprecated_call_site(stack_start):
    """The llava_mini frame that called into a library which warned, or None: the first frame above
    the warning that is neither library code nor an import (a warning raised while a library is
    imported is that library's, not ours)."""
    frame = stack_start
    while frame is not None:
        path = frame.f_code.co_filename
        if path.startswith("<frozen importlib"):
            return None
        if not path.startswith(LIBRARY_DIRS) or "/llava_mini/" in path:
            name = frame.f_globals.get("__name__", "")
            return f"{name}:{frame.f_lineno}" if name.startswith("llava_mini") else None
        frame = frame.f_back
    return None


@pytest.fixture(autouse=True)
def no_deprecated_calls(monkeypatch):
    """Fail a test in which this package's code calls something deprecated: a DeprecationWarning or
    FutureWarning whose nearest caller outside the libraries is a llava_mini module (transformers
    attributes its warnings to torch's Module.__call__, so warning filters by module cannot tell)."""
    found = []
    original = warnings.warn

    def warn(message, category=None, stacklevel=1, source=None, **kwargs):
        kind = category or (type(message) if isinstance(message, Warning) else UserWarning)
        if issubclass(kind, (DeprecationWarning, FutureWarning)):
            site = deprecated_call_site(sys._getframe(1))
            if site:
                found.append(f"{kind.__name__} from {site}: {message}")
        return original(message, category, stacklevel + 1, source, **kwargs)

    monkeypatch.setattr(warnings, "warn", warn)
    yield
    assert not found, "our code calls something deprecated:\n" + "\n".join(found)
