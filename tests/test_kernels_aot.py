"""Hopper (sm_90a) ahead-of-time compile without a GPU: the heaviest kernels use wgmma and spill nothing.

``benchmarks/kernels_aot.py`` drives the real host wrappers on meta tensors at the issue-14
configurations, intercepts each launch, compiles it as the launch would for sm_90a and reads
registers and spills from Triton's bundled ``ptxas -v``. The full table (every kernel, every config)
is the benchmark's job; this test compiles the two kernels with the most live registers, which are
the ones that spilled before: flash dK/dV at D=128 with GQA 4:1, and the lightning backward; and
the small-grid forward and dK/dV (GQA split, fp32 partials) of a ring shard (B=1, S=1024): the
forward spilled 32 B there with 4 warps.
It runs in a subprocess because the test process imports Triton with the interpreter on.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CODE = r"""
import json
from benchmarks import kernels_aot as ka
rows = []
small = ka.flash_launches(128, 4, b=1, s=1024)  # a ring shard: small-grid tiles, dK/dV GQA split
for config, launches, name in (("flash D128 GQA4", ka.flash_launches(128, 4), "_attn_bwd_dkdv"),
                               ("lightning D128", ka.lightning_launches(), "_chunk_bwd"),
                               ("flash small-grid D128 GQA4", small, "_attn_fwd"),
                               ("flash small-grid D128 GQA4", small, "_attn_bwd_dkdv")):
    la = [l for l in launches if l.fn.fn.__name__ == name]
    assert la, f"no {name} launch captured from the {config} wrapper"
    rows.append(ka.report(la[0], config).__dict__)
print("ROWS" + json.dumps(rows))
"""


def test_heaviest_kernels_use_wgmma_and_do_not_spill_on_sm90a():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", CODE], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(res.stdout.split("ROWS", 1)[1])
    for r in rows:
        where = f"{r['kernel']} ({r['config']}, {r['num_warps']} warps, {r['num_stages']} stages)"
        assert r["wgmma"], f"{where}: no wgmma.mma_async in the PTX (not using Hopper tensor cores)"
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, \
            f"{where}: spills {r['spill_stores']} B stores / {r['spill_loads']} B loads at {r['regs']} registers"
        assert 0 < r["regs"] <= 255
