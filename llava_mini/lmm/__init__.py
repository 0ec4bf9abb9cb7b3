"""LLaVA-Mini (image, HD, video) and the 576-token LLaVA-1.5 baseline, on transformers parts."""

from llava_mini.lmm.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX, LlavaMiniConfig
from llava_mini.lmm.generation import LLMInput
from llava_mini.lmm.model import LlavaMini, LlavaMiniEncoder, Savings
from llava_mini.lmm.prefusion import Prefix

__all__ = ["IGNORE_INDEX", "IMAGE_TOKEN_INDEX", "LLMInput", "LlavaMini", "LlavaMiniConfig", "LlavaMiniEncoder", "Prefix", "Savings"]
