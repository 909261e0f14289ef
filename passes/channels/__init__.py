"""Channel-group analysis: layouts (:mod:`.layout`), the walker (:mod:`.walker`) and one
rule per Relax op (:mod:`.rules`). See :mod:`.walker` for the contract."""

from . import rules  # noqa: F401  (registers the op rules)
from .layout import Layout, Segment
from .walker import (
    APPROXIMATE,
    HOMOGENEOUS,
    LINEAR,
    ODD,
    RULES,
    ChannelAnalysis,
    OpCost,
    Producer,
    Site,
    Space,
    analyze_channels,
    producer_names,
    rule,
)

__all__ = [
    "APPROXIMATE",
    "HOMOGENEOUS",
    "LINEAR",
    "ODD",
    "RULES",
    "ChannelAnalysis",
    "Layout",
    "OpCost",
    "Producer",
    "Segment",
    "Site",
    "Space",
    "analyze_channels",
    "producer_names",
    "rule",
]
