"""cepo_kernels: fused LM-head kernels for RLVR (GRPO / RLSD / CEPO).

Depends on torch only (and triton where present): import it from any RLVR codebase.

    from cepo_kernels import fused_logprobs, contrastive_evidence, fused_linear_ppo_loss
    from cepo_kernels import fused_linear_self_distill_loss   # OPSD / SDPO

See kernels/README.md for the math and an example.
"""

from ._validate import set_debug
from ._types import IGNORE_INDEX, Evidence, LogProbs, PPOStats, SelfDistillStats
from .backend import BACKENDS, get_backend, set_backend, use_backend
from .ops import (contrastive_evidence, fused_linear_ppo_loss, fused_linear_self_distill_loss,
                  fused_logprobs)

__all__ = [
    "BACKENDS", "IGNORE_INDEX", "Evidence", "LogProbs", "PPOStats", "SelfDistillStats",
    "contrastive_evidence", "fused_linear_ppo_loss", "fused_linear_self_distill_loss",
    "fused_logprobs", "get_backend", "set_backend", "set_debug",
    "use_backend",
]
__version__ = "0.1.0"
