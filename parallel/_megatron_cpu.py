"""The CPU path of the megatron-core adapter: one context manager, a no-op when CUDA is available.

megatron-core 0.16.1 assumes a GPU in a few hard-coded places that a gloo/CPU run of
:mod:`dist_attn.parallel.megatron` passes through. Rather than copying and editing megatron functions, every
adapter entry point runs under :func:`megatron_device_shim`, which, only when
``torch.cuda.is_available()`` is False, applies these patches for the duration of the call and
restores everything on exit:

1. ``torch.cuda.current_device()`` returns ``torch.device("cpu")``. Megatron allocates with
   ``device=torch.cuda.current_device()``: the DDP grad/param buffers
   (``distributed/param_and_grad_buffer.py``), the pipeline P2P receive buffers
   (``pipeline_parallel/p2p_communication.py``), the distributed optimizer's shards
   (``optimizer/distrib_optimizer.py``). On a CPU build the real call raises "Torch not compiled
   with CUDA enabled".
2. ``torch.cuda.synchronize()`` is a no-op. The P2P schedule synchronises after each batched
   send/recv (``batch_p2p_sync``); CPU collectives are already complete when they return.
3. A ``TorchFunctionMode`` rewrites ``device="cuda"`` (or ``"cuda:N"``, an int, a cuda
   ``torch.device``) to the CPU in every torch call, and makes ``Tensor.cuda()`` the identity:
   literal ``device="cuda"`` appears in the schedules' token counter
   (``pipeline_parallel/schedules.py``), the gradient-norm and clipping code
   (``optimizer/clip_grads.py``, ``utils.local_multi_tensor_l2_norm``) and the optimizers' scale /
   found-inf scalars (``optimizer/optimizer.py``).
4. Under the same mode ``Tensor.type()`` (no argument) names CPU tensors as their CUDA twins
   (``torch.FloatTensor`` -> ``torch.cuda.FloatTensor``): the (distributed) optimizer builds its
   fp32 main parameters by switching on ``param.type() == 'torch.cuda.FloatTensor'`` and raises
   TypeError on anything else (``optimizer/optimizer.py``, ``optimizer/distrib_optimizer.py``).

5. ``tensor_parallel.random._get_cuda_rng_state`` returns an empty tensor and
   ``_set_cuda_rng_state`` does nothing: megatron's activation recompute (``tensor_parallel.checkpoint``,
   ``CheckpointWithoutOutput``; ``trainer.recompute``) saves and restores the CUDA RNG state around
   every recomputed piece, which a CPU build of torch has not got. The CPU RNG state is still saved
   and restored, and the tracker's (empty on CPU) states too.

Not patched, because the adapter avoids the paths: the CUDA RNG tracker's seeding
(the adapter never calls ``model_parallel_cuda_manual_seed`` on CPU, builds without megatron's
initialisation and uses no dropout, see ``init_megatron``), CUDA streams (only with
``num_distributed_optimizer_instances > 1`` or overlapped communication, both off), fused kernels
(TransformerEngine / Apex absent: megatron falls back to torch implementations).

The mode intercepts every torch call made while it is active, including the model's forward and
backward inside megatron's schedule: a few microseconds per op, irrelevant next to gloo on CPU.
"""
from __future__ import annotations

import contextlib
import threading

import torch
from torch.overrides import TorchFunctionMode

_lock = threading.Lock()
_depth = 0
_saved: dict = {}


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)  # an int device is a CUDA ordinal


class _CudaToCpu(TorchFunctionMode):
    """Patches 3 and 4 of the module docstring."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        out = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and isinstance(out, str) \
                and out.startswith("torch.") and not out.startswith("torch.cuda."):
            return "torch.cuda." + out[len("torch."):]
        return out


def _cpu_current_device():
    return torch.device("cpu")


def _noop(*_args, **_kwargs):
    return None


def _no_cuda_rng_state(*_args, **_kwargs):
    return torch.empty(0, dtype=torch.uint8)


@contextlib.contextmanager
def megatron_device_shim():
    """Run megatron-core code on the CPU (see the module docstring); nothing happens with CUDA.

    Re-entrant: nested uses share one set of patches, removed when the outermost exits.
    """
    if torch.cuda.is_available():
        yield
        return
    global _depth
    with _lock:
        if _depth == 0:
            from megatron.core.tensor_parallel import random as mrandom
            _saved["current_device"] = torch.cuda.current_device
            _saved["synchronize"] = torch.cuda.synchronize
            _saved["rng"] = (mrandom, mrandom._get_cuda_rng_state, mrandom._set_cuda_rng_state)
            torch.cuda.current_device = _cpu_current_device
            torch.cuda.synchronize = _noop
            mrandom._get_cuda_rng_state, mrandom._set_cuda_rng_state = _no_cuda_rng_state, _noop
        _depth += 1
    try:
        with _CudaToCpu():
            yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                torch.cuda.current_device = _saved.pop("current_device")
                torch.cuda.synchronize = _saved.pop("synchronize")
                mrandom, get_state, set_state = _saved.pop("rng")
                mrandom._get_cuda_rng_state, mrandom._set_cuda_rng_state = get_state, set_state
