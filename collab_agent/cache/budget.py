"""What a KV budget is a share of, and the typed error for a bad KV-method argument.

Budget accounting (all methods, a token's K+V = 1 token equivalent, V alone = 0.5), one of two
modes (`KVMethod.budget_of`):

- ``"context"``: at every step the cache holds at most ``ceil(budget * L)`` token equivalents,
  L = every token seen so far (prompt and everything decoded), as in the SmallKV and H2O papers.
  The mode for a reasoning trace, whose decoded tokens outnumber the question's; the default of
  `TransformersBackend(kv_method=...)`.
- ``"prompt"``: the prompt is compressed to ``ceil(budget * P)`` (P = tokens seen when
  compression first happens) and every token processed after that adds one token equivalent to
  the allowance, as in kvpress, where the prompt is compressed and decoded tokens are appended.
  The default of a cache made by `KVMethod.new_cache` alone (`bench kv`, `bench kv-gsm8k`).
"""

from __future__ import annotations

from typing import Literal

BudgetOf = Literal["context", "prompt"]
"""What a budget is a share of: the whole current context, or the prompt (see the module)."""


class CacheConfigError(ValueError):
    """A KV-method argument is out of range or of the wrong kind; names the argument."""

    def __init__(self, argument: str, problem: str) -> None:
        self.argument = argument
        self.problem = problem
        super().__init__(f"{argument}: {problem}")


def check_budget_of(budget_of: object, argument: str = "budget_of") -> BudgetOf:
    if budget_of not in ("context", "prompt"):
        raise CacheConfigError(argument, f"must be 'context' or 'prompt', got {budget_of!r}")
    return budget_of  # type: ignore[return-value]


def check_budget(budget: object) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise CacheConfigError("budget", f"must be a fraction in (0, 1], got {budget!r}")
    return float(budget)
