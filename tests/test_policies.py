"""The named policies are classes: ``isinstance`` tells them apart, their repr names them, and
their constructor arguments reach the triggers they hold."""

from __future__ import annotations

import pytest

from collab_agent.errors import ConfigError
from collab_agent.policies import (
    CognitiveOffload,
    Escalation,
    InterventionRequest,
    LargeOnly,
    LargeSurprise,
    Policy,
    Repetition,
    SmallOnly,
    SmallUncertainty,
    SpecReason,
    StepJudge,
    StrategicPriming,
    SurpriseReason,
    TrigReason,
)
from collab_agent.policies.registry import BUILTIN, resolve_policy


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("small-only", SmallOnly),
        ("large-only", LargeOnly),
        ("trigreason", TrigReason),
        ("specreason", SpecReason),
        ("surprise", SurpriseReason),
        ("escalation", Escalation),
    ],
)
def test_each_builtin_policy_is_an_instance_of_its_class(name: str, cls: type[Policy]) -> None:
    policy = resolve_policy(name)
    assert isinstance(policy, cls) and isinstance(policy, Policy)
    assert type(policy) is cls and policy.name == name
    assert repr(policy).startswith(f"{cls.__name__}(")
    assert policy == cls()  # equal settings, equal policies
    assert set(BUILTIN) >= {name}


def test_trigreason_passes_its_arguments_to_its_three_triggers() -> None:
    policy = TrigReason(
        priming_steps=3, tau=1.2, rho=0.7, words=("hmm",), consecutive=2, answer_by="large"
    )
    priming, intervention, offload = policy.triggers
    assert isinstance(priming, StrategicPriming) and priming.steps == 3
    assert isinstance(intervention, InterventionRequest)
    assert intervention.words == ("hmm",) and intervention.consecutive == 2
    assert isinstance(offload, CognitiveOffload) and (offload.tau, offload.rho) == (1.2, 0.7)
    assert (policy.default_author, policy.answer_by) == ("small", "large")
    assert not isinstance(policy, SpecReason)


def test_the_other_policies_build_the_triggers_they_name() -> None:
    assert SmallOnly().answer_by == "small" and LargeOnly().default_author == "large"
    (judge,) = SpecReason(5.0, "expected").triggers
    assert isinstance(judge, StepJudge) and (judge.threshold, judge.score) == (5.0, "expected")
    kinds = [type(t) for t in SurpriseReason(threshold=2.0).triggers]
    assert kinds == [StrategicPriming, LargeSurprise, Repetition]
    assert [type(t) for t in SurpriseReason(priming_steps=0, repetition=None).triggers] == [
        LargeSurprise
    ]
    escalation = Escalation(threshold=0.9).triggers[-1]
    assert isinstance(escalation, SmallUncertainty) and escalation.escalate
    assert escalation.threshold == 0.9


def test_bad_arguments_still_raise_config_errors_naming_them() -> None:
    with pytest.raises(ConfigError, match="rho"):
        TrigReason(rho=2.0)
    with pytest.raises(ConfigError, match="answer_by"):
        Policy(answer_by="nobody")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="answer_by"):
        TrigReason(answer_by="nobody")  # type: ignore[arg-type]


def test_a_trigger_without_check_is_refused_with_the_hooks_it_needs() -> None:
    class Hooks:
        name = "hooks"

        async def before_step(self, trace):  # type: ignore[no-untyped-def]
            return None

        async def after_step(self, trace, step):  # type: ignore[no-untyped-def]
            return None

    with pytest.raises(ConfigError, match=r"check\(small, large\)"):
        Policy([Hooks()])  # type: ignore[list-item]
