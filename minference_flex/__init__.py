"""minference-flex: MInference's dynamic sparse attention on PyTorch FlexAttention.

    import minference_flex as mf
    out = mf.sparse_attention(q, k, v, [["vertical_and_slash", 1000, 6096]] * q.shape[1])
"""
from block_masks import Pattern

from .attention import AttentionPlan, plan_attention, run_plan, sparse_attention, token_mask
from .config import DEFAULT_PATTERN, parse_patterns

__all__ = [
    "AttentionPlan", "DEFAULT_PATTERN", "Pattern", "parse_patterns", "plan_attention", "run_plan",
    "sparse_attention", "token_mask",
]
__version__ = "0.1.0"
