"""The kernels layer: FlexAttention runner (``flex``), the log-sum-exp merge (``merge``), the strip
kernels (Triton ``strips``, Hopper ``hopper_strips``). Imports ``block_masks`` only."""
