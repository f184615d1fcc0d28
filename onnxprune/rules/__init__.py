"""Channel rules, one module per operator family, all registered in `RULES`."""

from onnxprune.rules.base import RULES, ChannelRule, register

# Importing the families registers their rules.
from onnxprune.rules import elementwise, conv, linear, norm, shape, pool  # noqa: E402,F401

__all__ = ["RULES", "ChannelRule", "register"]
