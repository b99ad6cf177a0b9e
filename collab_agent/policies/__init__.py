"""Who writes the next step: triggers and policies."""

from collab_agent.policies.base import BaseTrigger, Handoff, Policy, Reject, StepContext, Trigger
from collab_agent.policies.fixed import LargeOnly, SmallOnly
from collab_agent.policies.signals import (
    Escalation,
    LargeSurprise,
    Repetition,
    SmallUncertainty,
    StepSignal,
    SurpriseReason,
)
from collab_agent.policies.specreason import SpecReason, StepJudge
from collab_agent.policies.trigreason import (
    HESITATION_WORDS,
    CognitiveOffload,
    InterventionRequest,
    StrategicPriming,
    TrigReason,
    confident_share,
)

__all__ = [
    "HESITATION_WORDS",
    "BaseTrigger",
    "CognitiveOffload",
    "Escalation",
    "Handoff",
    "InterventionRequest",
    "LargeOnly",
    "LargeSurprise",
    "Policy",
    "Reject",
    "Repetition",
    "SmallOnly",
    "SmallUncertainty",
    "SpecReason",
    "StepContext",
    "StepJudge",
    "StepSignal",
    "StrategicPriming",
    "SurpriseReason",
    "TrigReason",
    "Trigger",
    "confident_share",
]
