"""The backends every kernel test runs: the chunked torch form everywhere, the Triton form on CUDA or, without CUDA, in
Triton's interpreter. TRITON_INTERPRET=1 is set here, at import, before any kernel is compiled."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hscr_fast.kernels._common import triton_available, triton_interpret_mode  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON_RUNNABLE = triton_available() and (DEVICE.type == "cuda" or triton_interpret_mode())
NEEDS_TRITON = pytest.mark.skipif(not TRITON_RUNNABLE, reason="triton missing, or CPU without TRITON_INTERPRET=1")
BACKENDS = ["torch", pytest.param("triton", marks=NEEDS_TRITON)]
