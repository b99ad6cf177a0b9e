"""A custom trigger policy: let the large model check the small model's arithmetic.

A trigger is one small class with two optional async hooks (see ``collab_agent.policies``):
``before_step(trace)`` may hand the next steps to the large model, ``after_step(trace, step)``
may reject a small-model step so the large model rewrites it from the same prefix. Here,
``ArithmeticCheck`` rejects every small-model step that states a calculation result
("... = 391"), composed with TrigReason's own triggers. Runs offline on the bundled models:

    python examples/custom_trigger.py
    python examples/custom_trigger.py --models tiny   # random-weight tiny models, as the tests run it
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

from collab_agent import (
    PRESETS,
    BaseTrigger,
    CollabChatModel,
    InterventionRequest,
    Policy,
    Reject,
    Step,
    StrategicPriming,
    Trace,
)


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
    parser.add_argument(
        "--models", choices=sorted(PRESETS), default="llamacpp", help="model pair (tiny: tests)"
    )
    parser.add_argument("--small", help="small model spec (default: the --models pair's)")
    parser.add_argument("--large", help="large model spec (default: the --models pair's)")
    parser.add_argument("--budget", type=int, default=384, help="most reasoning tokens")
    parser.add_argument("--max-tokens", type=int, default=1024, help="most answer tokens")
    args = parser.parse_args()
    args.small = args.small or PRESETS[args.models][0]
    args.large = args.large or PRESETS[args.models][1]

    policy = Policy(
        triggers=(StrategicPriming(steps=1), ArithmeticCheck(), InterventionRequest()),
        name="trigreason+arithmetic",
    )
    model = CollabChatModel(
        small=args.small,
        large=args.large,
        policy=policy,
        temperature=0,
        reasoning_budget=args.budget,
        max_tokens=args.max_tokens,
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
