"""The one set of defaults the library, the command line and ``eval`` share.

README "Defaults" shows them beside the paper's settings. They are tuned for the bundled
instruct pair (Qwen2.5-Coder 0.5B/1.5B), which writes 5-10 short steps per problem: the paper's
20 priming steps would leave the small model nothing to write, and greedy decoding makes runs
repeatable. The reasoning budget is capped to what each model's context leaves after the prompt
and the answer when it is not set explicitly (`collab_agent.core.context`).
"""

from __future__ import annotations

PRIMING_STEPS = 1
"""Steps the large model writes first (TrigReason's strategic priming; paper: 20)."""

TEMPERATURE = 0.0
"""Sampling temperature of every step and the answer; 0 is greedy (paper: 0.6)."""

TOP_P = 0.95
"""Nucleus sampling mass when the temperature is above 0 (paper: 0.95)."""

REASONING_BUDGET = 1024
"""Most reasoning tokens of accepted steps (paper: 8192, for long ``<think>`` traces)."""

MAX_STEPS = 256
"""Most reasoning steps."""

STEP_MAX_TOKENS = 512
"""Most tokens of one reasoning step; a longer step continues in the next."""

ANSWER_MAX_TOKENS = 1024
"""Most tokens of the answer."""

EVAL_MAX_STEPS = 48
"""Most reasoning steps of one problem in ``collab-agent eval``/``calibrate`` and ``evaluate``."""

EVAL_STEP_MAX_TOKENS = 256
"""Most tokens of one step in an evaluation."""

EVAL_ANSWER_MAX_TOKENS = 48
"""Most tokens of an evaluation's answer (a short final answer to grade)."""

CONTEXT_MARGIN = 32
"""Tokens kept free in each model's context for step delimiters and the answer's lead."""
