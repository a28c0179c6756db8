"""The fused softmax-attention engine: one forward and one backward for every
softmax variant, parameterized by a block schedule and an in-block token mask."""

from .configs import force_config
from .launch import BlockLists, Schedule, attention_backward, attention_forward, new_output

__all__ = ["BlockLists", "Schedule", "attention_backward", "attention_forward", "force_config", "new_output"]
