"""The installed package has one import root, ``dist_attn``, and coexists with Hugging Face's ``kernels``.

* A real (non-editable) wheel built from this checkout holds exactly one top-level package,
  ``dist_attn`` (plus its dist-info), with ``dist_attn/kernels``, ``dist_attn/parallel`` and every
  ``dist_attn/configs`` YAML file (config groups in sub-folders included).
* Installed into one fresh virtual environment beside Hugging Face's ``kernels`` (from PyPI), both
  import: ``import kernels`` is Hugging Face's, ``import dist_attn.kernels`` ours, from the wheel.
  The fresh environment sees torch through a ``.pth`` line naming the development venv's
  site-packages (a directory added that way has its own ``.pth`` files ignored, so the development
  venv's editable install of dist_attn does not leak in; the test checks where dist_attn comes from).
* Every folder with an ``__init__.py`` under dist_attn/, kernels/, parallel/ and configs/ is listed in
  pyproject's ``packages`` (a missing one would silently be left out of the wheel).

System tier (tests/conftest.py): builds a wheel and installs from PyPI (about 10-40 s, pip's cache
helps); skipped, saying why, when PyPI cannot be reached.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tomllib
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAPPED = {"dist_attn": "dist_attn", "kernels": "dist_attn.kernels", "parallel": "dist_attn.parallel",
          "configs": "dist_attn.configs"}


def _pyproject() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    found = set()
    for folder, name in MAPPED.items():
        for d, dirs, files in os.walk(os.path.join(ROOT, folder)):
            dirs[:] = [x for x in dirs if x != "__pycache__"]
            if "__init__.py" in files:
                rel = os.path.relpath(d, os.path.join(ROOT, folder))
                found.add(name if rel == "." else name + "." + rel.replace(os.sep, "."))
    missing = sorted(found - listed)
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml"


def _pypi_reachable() -> bool:
    try:
        with socket.create_connection(("pypi.org", 443), timeout=5):
            return True
    except OSError:
        return False


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
    """A wheel built from a copy of the checkout's files (the build leaves no build/ in the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src, out = tmp / "src", tmp / "dist"
    files = _run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT).stdout.split()
    for rel in files:
        if os.path.isfile(os.path.join(ROOT, rel)):
            os.makedirs(src / os.path.dirname(rel), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, rel), src / rel)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)])
    (whl,) = list(out.glob("dist_attn-*.whl"))
    return str(whl)


def test_wheel_has_one_top_level_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"dist_attn", next(t for t in tops if t.endswith(".dist-info"))}, sorted(tops)
    for pkg in ("dist_attn/kernels/__init__.py", "dist_attn/kernels/flash_attn/__init__.py",
                "dist_attn/parallel/deepspeed.py", "dist_attn/parallel/megatron.py", "dist_attn/configs/train.yaml",
                "dist_attn/cli.py", "dist_attn/engines.py", "dist_attn/plan.py"):
        assert pkg in names, f"{pkg} missing from the wheel"
    yamls = sorted(os.path.relpath(os.path.join(d, f), os.path.join(ROOT, "configs"))
                   for d, _, fs in os.walk(os.path.join(ROOT, "configs")) for f in fs if f.endswith(".yaml"))
    assert any(os.sep in y for y in yamls), "expected config groups in sub-folders"
    missing = [y for y in yamls if f"dist_attn/configs/{y}" not in names]
    assert not missing, f"config files missing from the wheel: {missing}"
    entry = [n for n in names if n.endswith("entry_points.txt")]
    assert entry and "dist-attn-train = dist_attn.cli:main" in zipfile.ZipFile(wheel).read(entry[0]).decode()


def test_wheel_coexists_with_huggingface_kernels(wheel, tmp_path):
    if not _pypi_reachable():
        pytest.skip("PyPI (pypi.org:443) is unreachable: cannot install Hugging Face's kernels package")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = str(venv / "bin" / "python")
    pip = [sys.executable, "-m", "pip", "--python", py, "install", "-q", "--disable-pip-version-check"]
    _run(pip + ["--no-deps", wheel])         # ours: torch and friends come from the dev venv (below)
    _run(pip + ["kernels"])                  # Hugging Face's, with its dependencies, from PyPI
    site = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    with open(os.path.join(site, "zz_dev_venv.pth"), "w") as f:  # appended after the venv's own packages
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    code = ("import kernels, dist_attn, dist_attn.kernels, dist_attn.parallel, dist_attn.configs\n"
            "import importlib.metadata as md\n"
            "from dist_attn import ring_attention, CPContext\n"
            "from dist_attn.kernels.flash_attn import softmax_kernel\n"
            "from dist_attn.engines import ENGINES\n"
            "print(kernels.__file__); print(dist_attn.__file__); print(dist_attn.kernels.__file__)\n"
            "print(md.distribution('kernels').metadata['Summary'])\n"
            "print(hasattr(kernels, 'get_kernel'))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    out = _run([py, "-c", code], cwd=str(tmp_path), env=env).stdout.split("\n")
    hf_file, ours, our_kernels, _about, has_get_kernel = out[:5]
    assert hf_file.startswith(site) and os.sep + "kernels" + os.sep in hf_file, hf_file
    assert has_get_kernel == "True", "import kernels did not give Hugging Face's package"
    assert ours.startswith(site) and our_kernels.startswith(os.path.join(site, "dist_attn", "kernels")), \
        (ours, our_kernels)  # the wheel's copy, not the checkout's editable install
