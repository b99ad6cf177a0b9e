"""The old home of the KV framework, kept for imports written against it: each name now lives in
the module of its one job (`attention`, `observer`, `slots`, `layer`, `compressed`, `method`)."""

from collab_agent.cache.attention import (
    ATTENTION_NAME,
    attention_probs,
    kv_attention,
    register_attention,
    use_kv_attention,
)
from collab_agent.cache.budget import BudgetOf, CacheConfigError, check_budget, check_budget_of
from collab_agent.cache.compressed import CompressedCache
from collab_agent.cache.h2o import accumulate_scores
from collab_agent.cache.layer import KVLayer
from collab_agent.cache.method import KVMethod, LayerPlan
from collab_agent.cache.observer import (
    ObservedCache,
    ObservedLayer,
    calibration_rows,
    calibration_start,
)

__all__ = [
    "ATTENTION_NAME",
    "BudgetOf",
    "CacheConfigError",
    "CompressedCache",
    "KVLayer",
    "KVMethod",
    "LayerPlan",
    "ObservedCache",
    "ObservedLayer",
    "accumulate_scores",
    "attention_probs",
    "calibration_rows",
    "calibration_start",
    "check_budget",
    "check_budget_of",
    "kv_attention",
    "register_attention",
    "use_kv_attention",
]
