"""A LangGraph agent whose model is the collaborating pair, calling a tool.

Human -> AI (reasons, then calls ``convert_currency``) -> Tool -> AI (reasons, answers).
Streams with ``stream_mode="messages"``: reasoning steps, the tool call, the tool's result and
the answer, as they happen. Runs offline on the bundled models:

    python examples/agent.py "How many euros is 250 US dollars?"
    python examples/agent.py --models tiny   # random-weight tiny models, as the tests run it
"""

from __future__ import annotations

import argparse
from typing import Literal

from langchain.agents import create_agent
from langchain_core.messages import AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.tools import tool

from collab_agent import PRESETS, CollabChatModel, TrigReason

RATES = {("USD", "EUR"): 0.92, ("EUR", "USD"): 1.09, ("USD", "GBP"): 0.79, ("GBP", "USD"): 1.27}


Currency = Literal["USD", "EUR", "GBP"]
"""The codes the tool knows; its schema lists them, so the model writes ``"USD"``, not
``"US dollar"``."""


@tool
def convert_currency(amount: float, source: Currency, target: Currency) -> str:
    """Convert an amount of money from the source currency to the target."""
    rate = RATES.get((source.upper(), target.upper()))
    if rate is None:
        return f"No rate for {source} -> {target}; known pairs: {sorted(RATES)}"
    return f"{amount} {source.upper()} = {amount * rate:.2f} {target.upper()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="?", default="How many euros is 250 US dollars?")
    parser.add_argument(
        "--models", choices=sorted(PRESETS), default="llamacpp", help="model pair (tiny: tests)"
    )
    parser.add_argument("--small", help="small model spec (default: the --models pair's)")
    parser.add_argument("--large", help="large model spec (default: the --models pair's)")
    parser.add_argument("--budget", type=int, default=256, help="most reasoning tokens")
    parser.add_argument("--max-tokens", type=int, default=128, help="most answer tokens")
    args = parser.parse_args()
    args.small = args.small or PRESETS[args.models][0]
    args.large = args.large or PRESETS[args.models][1]

    model = CollabChatModel(
        small=args.small,
        large=args.large,
        policy=TrigReason(priming_steps=1),
        temperature=0,
        reasoning_budget=args.budget,
        max_tokens=args.max_tokens,
    )
    agent = create_agent(model, tools=[convert_currency])

    for message, metadata in agent.stream(
        {"messages": [HumanMessage(args.question)]}, stream_mode="messages"
    ):
        if isinstance(message, ToolMessage):
            print(f"\n[tool {message.name}] {message.content}")
        elif isinstance(message, AIMessageChunk):
            if step := message.additional_kwargs.get("reasoning_content"):
                print(f"\033[2m{step}\033[0m", end="", flush=True)
            for call in message.tool_call_chunks:
                print(f"\n[calls {call['name']}({call['args']})]")
            if message.text:
                print(f"\n{message.text}", end="")
            if collab := message.response_metadata.get("collab"):
                print(
                    f"\n[{metadata['langgraph_node']}: steps by author "
                    f"{collab['steps_by_author']}, triggers {collab['triggers']}]"
                )


if __name__ == "__main__":
    main()
