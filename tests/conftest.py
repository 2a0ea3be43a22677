"""Test-wide setup. Triton kernels run in the CPU interpreter when no GPU is present; the
variable must be set before triton is first imported, which is why it lives here."""
import os

try:  # decide without importing triton
    import torch
    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
