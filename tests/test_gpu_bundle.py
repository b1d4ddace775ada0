"""The GPU bundle meets a simulated device: a fresh environment with only torch and the packages the device image
holds, no network, no ../shared. Its own run.sh installs its wheels and runs the protocol's dry run on both tasks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, require_shared

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_bundle

# what the device image holds of what iss needs (the device tool's KINDS.md); the bundle must bring the rest
DEVICE_PACKAGES = ["transformers", "accelerate", "tokenizers", "safetensors", "numpy", "pyarrow", "pandas", "scipy",
                   "scikit-learn", "matplotlib", "typer", "rich", "tqdm", "pyyaml", "jinja2", "filelock", "fsspec",
                   "xxhash", "requests"]  # fmt: skip


def _python(venv: Path) -> str:
    return str(venv / "bin" / "python")


@pytest.fixture(scope="module")
def device_env(tmp_path_factory) -> Path:
    """A virtual environment like the device's Python: torch and DEVICE_PACKAGES, none of gpu_bundle.MISSING."""
    venv = tmp_path_factory.mktemp("device") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [_python(venv), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, *DEVICE_PACKAGES], check=True)
    subprocess.run([_python(venv), "-m", "pip", "uninstall", "--quiet", "-y", *gpu_bundle.MISSING], check=True)
    return venv


def _checkout(tmp_path: Path) -> Path:
    """A copy of the code (src, benchmarks, configs) with no ../shared beside it."""
    checkout = tmp_path / "checkout"
    for folder in ("src", "benchmarks", "configs"):
        shutil.copytree(REPO / folder, checkout / folder, ignore=shutil.ignore_patterns("results", "__pycache__"))
    return checkout


THIS_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"  # the device runs 3.12; the simulated one this


@pytest.mark.slow
def test_the_bundle_runs_both_gate_tasks_on_a_simulated_device(device_env, tmp_path):
    require_shared()
    checkout = _checkout(tmp_path)
    bundle = checkout / gpu_bundle.BUNDLE_NAME
    manifest = gpu_bundle.build(bundle, max_docs=3000, python_version=THIS_PYTHON)
    assert manifest["bytes"] < gpu_bundle.LIMIT_MIB * 2**20 and len(manifest["wheels"]) == len(gpu_bundle.MISSING)
    missing = subprocess.run([_python(device_env), "-c", "import pydantic"], capture_output=True)
    assert missing.returncode != 0  # the simulated device lacks what the bundle must bring

    out = tmp_path / "out"
    env = {"PATH": f"{device_env / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "OUT": str(out)}
    env |= {"PIP_NO_INDEX": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    result = subprocess.run(["bash", str(bundle / "run.sh"), "--dry-run"], cwd=checkout, env=env,
                            capture_output=True, text=True, timeout=1500)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for task in gpu_bundle.TASKS:
        record = json.loads((out / f"gpu_protocol_{task}.json").read_text(encoding="utf-8"))
        assert record["dry_run"] and record["device"].startswith("cpu")
        assert {run["method"] for run in record["runs"]} >= {"tlm", "random-corpus", "iss", "none"}
        assert record["verdict"][0]["control"] is not None  # the control was read, in the device's own run
        log = (out / f"gpu_protocol_{task}.log").read_text(encoding="utf-8")
        assert log.index("device cpu") < log.index("wrote")  # the estimate is printed before any stage


def test_a_bundle_without_a_needed_wheel_fails_on_the_simulated_device(device_env, tmp_path):
    """The simulation can fail: with pydantic's wheel gone, run.sh stops at the first import of iss's config."""
    require_shared()
    checkout = _checkout(tmp_path)
    bundle = checkout / gpu_bundle.BUNDLE_NAME
    gpu_bundle.build(bundle, max_docs=200, python_version=THIS_PYTHON)
    for wheel in (bundle / "wheels").glob("pydantic-*.whl"):
        wheel.unlink()
    env = {"PATH": f"{device_env / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "OUT": str(tmp_path / "out")}
    env["PIP_NO_INDEX"] = "1"
    result = subprocess.run(["bash", str(bundle / "run.sh"), "--dry-run"], cwd=checkout, env=env,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode != 0 and "pydantic" in result.stdout + result.stderr
