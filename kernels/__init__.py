"""cepo_kernels: fused LM-head kernels for RLVR (GRPO / RLSD / CEPO).

Depends on torch only (and triton where present): import it from any RLVR codebase.

    from cepo_kernels import fused_logprobs, contrastive_evidence, fused_linear_ppo_loss
    from cepo_kernels import fused_linear_self_distill_loss   # OPSD / SDPO

See kernels/README.md for the math and an example.
"""

if __name__ == "cepo_kernels":
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
else:
    # This folder is also importable as ``kernels`` wherever the repository root is on
    # sys.path (python -m / torchrun from a checkout, pytest), and Hugging Face's ``kernels``
    # package has that name: transformers probes it by importing it. Loaded a second time
    # under that name, the ops would register their custom ops (``cepo_kernels::...``)
    # twice, the second unregistering the first under the live package. So under any other
    # name this is an empty module (no ``__version__``: transformers then sees no usable
    # ``kernels`` package, which is the truth).
    __all__ = []
