"""A plain LangChain chain on the collaborating pair: prompt | model | parser.

The small Qwen2.5-Coder 0.5B writes most reasoning steps, the 1.5B steps in when a TrigReason
trigger fires. The chain's output is the answer; the reasoning and the per-step trace ride along
on the AIMessage. Runs offline on the bundled models:

    python examples/chain.py "A bakery sold 24 muffins at $3 and 40 cookies at $1.50. Revenue?"
    python examples/chain.py --models tiny   # random-weight tiny models, as the tests run it
"""

from __future__ import annotations

import argparse

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from collab_agent import PRESETS, CollabChatModel, TrigReason

QUESTION = "A train travels 60 km in 45 minutes. What is its speed in km/h?"
SYSTEM = "You are a careful math tutor."


def build_model(
    small: str, large: str, budget: int = 512, max_tokens: int = 128
) -> CollabChatModel:
    """The pair as this example runs it (the tests build it here too)."""
    return CollabChatModel(
        small=small,
        large=large,
        policy=TrigReason(),  # priming 1 (the library default; the paper primes 20)
        temperature=0,
        reasoning_budget=budget,
        max_tokens=max_tokens,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="?", default=QUESTION)
    parser.add_argument(
        "--models", choices=sorted(PRESETS), default="llamacpp", help="model pair (tiny: tests)"
    )
    parser.add_argument("--small", help="small model spec (default: the --models pair's)")
    parser.add_argument("--large", help="large model spec (default: the --models pair's)")
    parser.add_argument("--budget", type=int, default=512, help="most reasoning tokens")
    parser.add_argument("--max-tokens", type=int, default=128, help="most answer tokens")
    args = parser.parse_args()
    args.small = args.small or PRESETS[args.models][0]
    args.large = args.large or PRESETS[args.models][1]

    model = build_model(args.small, args.large, args.budget, args.max_tokens)
    prompt = ChatPromptTemplate.from_messages([("system", SYSTEM), ("human", "{question}")])

    # 1. The chain: the answer as a string.
    chain = prompt | model | StrOutputParser()
    print("answer:", chain.invoke({"question": args.question}))

    # 2. The same call, streamed: reasoning steps as they are written, then the answer.
    print("\n--- streamed ---")
    trace = None
    for chunk in (prompt | model).stream({"question": args.question}):
        if step := chunk.additional_kwargs.get("reasoning_content"):
            print(step, end="", flush=True)
        elif chunk.content:
            print(f"\n\nanswer: {chunk.content}")
        trace = chunk.response_metadata.get("collab", trace)
    if trace:
        print("\nwho wrote each step:", [(s["author"], s["trigger"]) for s in trace["steps"]])
        print(f"small model wrote {trace['small_token_share']:.0%} of reasoning tokens;")
        print("triggers fired:", trace["triggers"], f"; latency {trace['latency_s']:.1f}s")


if __name__ == "__main__":
    main()
