"""minference-flex: MInference's dynamic sparse attention on PyTorch FlexAttention.

    import minference_flex as mf
    out = mf.sparse_attention(q, k, v, [["vertical_and_slash", 1000, 6096]] * q.shape[1])
"""
from block_masks import Pattern

from minference_flex.attention import AttentionPlan, plan_attention, run_plan, sparse_attention, token_mask
from minference_flex.head_patterns import DEFAULT_PATTERN, parse_patterns
from minference_flex.hf import (DEFAULT_MIN_SPARSE_LEN, clear_dispatch_counts, configure, dispatch_counts, get_patterns,
                                register, save_patterns, set_patterns, settings)
from minference_flex.search import SearchResult, search_patterns

register()  # attn_implementation="minference_flex" in transformers

__all__ = [
    "AttentionPlan", "DEFAULT_MIN_SPARSE_LEN", "DEFAULT_PATTERN", "Pattern", "clear_dispatch_counts", "configure",
    "dispatch_counts", "get_patterns", "parse_patterns", "settings",
    "SearchResult", "plan_attention", "run_plan", "save_patterns", "search_patterns", "set_patterns",
    "sparse_attention", "token_mask",
]
__version__ = "0.1.0"
