"""Training LLaVA-Mini: the released two-stage recipe on a synthetic task whose answers only the pixels hold.

It drives ``llava_mini.lmm`` (``LlavaMini(..., labels=...)``); ``lmm`` does not import it.
``llava-mini train`` (``llava_mini.cli``) runs ``train``.
"""

from llava_mini.training.recipe import STAGES, TrainConfig, evaluate, train
from llava_mini.training.task import COLOURS, ColourTask

__all__ = ["COLOURS", "ColourTask", "STAGES", "TrainConfig", "evaluate", "train"]
