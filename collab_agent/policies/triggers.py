"""The registry of built-in trigger kinds by name: the one list of trigger names.

Policy files name a trigger by its ``name`` (``"large_surprise"``...), calibration builds its
candidates from these classes, and the tests check that every candidate and every built-in
policy uses a registered trigger. A new built-in trigger is added here, once.
"""

from __future__ import annotations

from collab_agent.policies.base import BaseTrigger
from collab_agent.policies.signals import LargeSurprise, Repetition, SmallUncertainty
from collab_agent.policies.specreason import StepJudge
from collab_agent.policies.trigreason import (
    CognitiveOffload,
    InterventionRequest,
    StrategicPriming,
)

TRIGGERS: dict[str, type[BaseTrigger]] = {
    cls.name: cls
    for cls in (
        StrategicPriming,
        CognitiveOffload,
        InterventionRequest,
        LargeSurprise,
        SmallUncertainty,
        Repetition,
        StepJudge,
    )
}
"""Every built-in trigger class by its ``name``; any other dataclass trigger is named
``"module:Class"`` in a policy file."""

__all__ = ["TRIGGERS"]
