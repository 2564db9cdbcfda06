"""Shared pytest set-up.

* On a machine without CUDA the Triton kernels run under the Triton interpreter
  (``TRITON_INTERPRET=1``); the variable must be set before any ``@triton.jit``
  function is defined, so it is set here, before the package is imported.
* Megatron's ``@jit_fuser`` helpers would silently invoke Inductor on the first
  call on CPU; eager-only tests do not need that, the compile smoke test turns
  dynamo back on explicitly.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield
