"""One registry of trigger names: every trigger a policy file, a calibration candidate or a
built-in policy can hold is registered once in `TRIGGERS`, under its own name, and survives a
policy file."""

from __future__ import annotations

import pytest

import collab_agent.policies as policies
from collab_agent.calibration import CANDIDATES
from collab_agent.policies.files import policy_from_dict, policy_to_dict, trigger_types
from collab_agent.policies.registry import BUILTIN
from collab_agent.policies.triggers import TRIGGERS


def test_each_trigger_is_registered_under_its_own_name_and_exported() -> None:
    for name, cls in TRIGGERS.items():
        assert cls.name == name
        assert getattr(policies, cls.__name__) is cls
    assert trigger_types() == TRIGGERS


@pytest.mark.parametrize("name", sorted(CANDIDATES))
def test_every_calibration_candidate_builds_a_registered_trigger(name: str) -> None:
    candidate = CANDIDATES[name]()
    assert candidate.name == name
    trigger = candidate.build(0.5)
    assert TRIGGERS[trigger.name] is type(trigger)
    policy = policies.Policy(triggers=(trigger,), name=name)
    loaded = policy_from_dict(policy_to_dict(policy))
    assert loaded.triggers == (trigger,)


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_every_built_in_policy_holds_only_registered_triggers(name: str) -> None:
    policy = BUILTIN[name]()
    for trigger in policy.triggers:
        assert TRIGGERS[trigger.name] is type(trigger)
    data = policy_to_dict(policy)
    assert all(entry["type"] in TRIGGERS for entry in data["triggers"])
    assert policy_to_dict(policy_from_dict(data)) == data


def test_every_registered_step_signal_is_a_calibration_candidate() -> None:
    from collab_agent.policies.signals import StepSignal

    signals = {name for name, cls in TRIGGERS.items() if issubclass(cls, StepSignal)}
    assert signals == {"large_surprise", "small_uncertainty", "repetition"}
    for name in signals:
        assert type(CANDIDATES[name]().build(0.5)) is TRIGGERS[name]
