"""Test-wide setup. Triton kernels run in the CPU interpreter when no GPU is present; the
variable must be set before triton is first imported, which is why it lives here. Thread counts are
pinned before torch is imported: spawned gloo workers and the main process share 2 cores."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
