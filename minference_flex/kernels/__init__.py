"""The kernels layer. Imports ``block_masks`` only (never ``minference_flex.attention``): it runs what a
plan says and decides nothing about it.

- ``flex``: the FlexAttention runner and ``merge`` of a plan's parts; ``merge``: the Triton merge pass;
- ``contract``: what the strip kernels share (strip / segment sizes, the Triton import guard, shared
  jit helpers, TMA operands);
- ``triton_strips``: the Triton strip kernel and its launcher; ``hopper_strips``: the Gluon kernel for
  Hopper GPUs over the plan's segments;
- ``dispatch``: the plan's strip backend (``strip_backend``, asked at plan time) and the strip part run
  with it (``strip_attention``; ``strip_attention_op`` inside a caller's ``torch.compile``).
"""
