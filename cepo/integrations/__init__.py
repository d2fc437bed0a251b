"""Adapters that bring cepo's fused kernels and CEPO into other RLVR trainers.

    from cepo.integrations.trl import CEPOGRPOTrainer     # needs `pip install "cepo[trl]"`

This package imports no third-party trainer at import time; each adapter module imports
its framework itself. ``cepo_kernels`` and ``cepo``'s own trainer never import these.
"""
