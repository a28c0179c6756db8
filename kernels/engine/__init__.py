"""The fused softmax-attention engine: one forward and one backward for every
softmax variant, parameterized by a block schedule, an in-block token mask, and
optional score and mask mods (see ``attnkit.engine.Schedule`` and ``attnkit.mods``;
docs/architecture.md, The fused softmax engine)."""

from attnkit.engine import BlockLists, Const, Schedule

from ..common import new_output
from .configs import force_config
from .launch import attention_backward, attention_forward

__all__ = ["BlockLists", "Const", "Schedule", "attention_backward", "attention_forward", "force_config",
           "new_output"]
