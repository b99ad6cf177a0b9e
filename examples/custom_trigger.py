"""A custom trigger policy: let the large model check the small model's arithmetic.

A trigger is one small class with two optional async hooks (see ``collab_agent.policies``):
``before_step(trace)`` may hand the next steps to the large model, ``after_step(trace, step)``
may reject a small-model step so the large model rewrites it from the same prefix. Here,
``ArithmeticCheck`` rejects every small-model step that states a calculation result
("... = 391"), composed with TrigReason's own triggers. Runs offline on the bundled models:

    python examples/custom_trigger.py
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

from collab_agent.backends.specs import PRESETS
from collab_agent.chat_model import CollabChatModel
from collab_agent.policies import (
    BaseTrigger,
    InterventionRequest,
    Policy,
    Reject,
    StrategicPriming,
)
from collab_agent.trace import Step, Trace


@dataclass
class ArithmeticCheck(BaseTrigger):
    """Reject a small-model step that states the result of a calculation; the large model
    rewrites it (small models make most of their mistakes in arithmetic).

    Attributes:
        pattern: what counts as a stated result (default: digits, an operator, "=", a number).
    """

    pattern: str = r"\d\s*[-+*/x×]\s*\d[^=\n]*=\s*-?\d"
    name: str = "arithmetic_check"

    async def after_step(self, trace: Trace, step: Step) -> Reject | None:
        if re.search(self.pattern, step.text):
            return Reject(self.name, detail="the step states a calculation result")
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "question", nargs="?", default="A shop sells 17 boxes of 23 pens. How many pens?"
    )
    parser.add_argument("--small", default=PRESETS["llamacpp"][0], help="small model spec")
    parser.add_argument("--large", default=PRESETS["llamacpp"][1], help="large model spec")
    args = parser.parse_args()

    policy = Policy(
        triggers=(StrategicPriming(steps=1), ArithmeticCheck(), InterventionRequest()),
        name="trigreason+arithmetic",
    )
    model = CollabChatModel(
        small=args.small, large=args.large, policy=policy, temperature=0, reasoning_budget=384
    )
    result = model.invoke(args.question)
    collab = result.response_metadata["collab"]
    for step in collab["steps"]:
        mark = " (rewrote a rejected small step)" if step["rejected"] else ""
        print(f"step {step['index']}: {step['author']:5} {step['trigger'] or '':18}{mark}")
    print("answer:", result.content)
    print("triggers fired:", collab["triggers"])
    print(f"small model wrote {collab['small_token_share']:.0%} of reasoning tokens")


if __name__ == "__main__":
    main()
