"""Test set-up: Triton kernels run in the CPU interpreter when no GPU is present.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at
collection time, before any test module imports cepo_kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# keep CPU tests predictable on small machines
torch.set_num_threads(min(2, torch.get_num_threads()))
