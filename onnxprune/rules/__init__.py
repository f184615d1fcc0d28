"""Channel rules, one module per operator family, all registered in `RULES`.

Start reading at `base` (the rule class and the registry) and `protocols` (what a rule may ask of the
analysis); `facts` answers per-operator questions from the same registry.
"""

from onnxprune.rules import (  # noqa: F401  (registers the rules)
    attention,
    contrib,
    control,
    conv,
    elementwise,
    gather,
    linear,
    norm,
    pool,
    quantize,
    recurrent,
    reshape,
    selection,
    shape,
)
from onnxprune.rules.base import RULES, ChannelRule, OpFacts, register

RULES.check()

__all__ = ["RULES", "ChannelRule", "OpFacts", "register"]
