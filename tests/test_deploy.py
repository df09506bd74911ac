"""Deployment without Python (docs/deploying.md): the ops are defined from one schema file in
both installs, the native library has no Python in it, and the C++ example (examples/cpp/)
builds with CMake and runs a TorchScript model and an AOTInductor package of a model holding
FusedLSTM and FusedLSTMCell, with Python's outputs and gradients."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.jit._pickle

import fused_lstm
from fused_lstm import _backend, _library
from helpers import needs_extension

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "cpp"


def test_the_ops_are_those_of_the_schema_file():
    """Defined by csrc/schemas.cpp in a native install and by _library.py without one, from
    op_schemas.inc both: each op's schema and tags are the file's, and there is no other op."""
    registered = {
        name.split("::")[1]
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("fused_lstm::")
    }
    assert registered == set(_library.TAGS)
    for schema in _library.SCHEMAS:
        name = _library._name(schema)
        op = getattr(torch.ops.fused_lstm, name).default
        assert str(op._schema) == str(torch._C.parse_schema(f"fused_lstm::{schema}"))
        assert set(op.tags) == set(_library.TAGS[name])
    assert _library.TAGS["keep_mask"] == (torch.Tag.nondeterministic_seeded,)


@needs_extension
def test_the_native_library_has_no_python_in_it():
    """A C++ program without libpython loads it: no Python symbol, no Python library needed."""
    undefined = subprocess.run(
        ["nm", "-D", "--undefined-only", str(_backend.LIBRARY)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert undefined and not [s for s in undefined if s.startswith(("Py", "_Py", "pybind11"))]
    dynamic = subprocess.run(
        ["readelf", "-d", str(_backend.LIBRARY)], capture_output=True, text=True, check=True
    ).stdout
    needed = [line for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert any("libtorch_cpu.so" in line for line in needed)
    assert not [line for line in needed if "python" in line], needed


def _cmake_args() -> list[str]:
    prefix = f"{torch.utils.cmake_prefix_path};{fused_lstm.cmake_prefix_path}"
    args = [f"-DCMAKE_PREFIX_PATH={prefix}", "-DCMAKE_BUILD_TYPE=Release"]
    if torch.version.cuda is not None:
        # What torch's own CMake configuration of a CUDA build needs (docs/deploying.md).
        args.append(f"-DCUDA_TOOLKIT_ROOT_DIR={os.environ.get('CUDA_HOME', '/usr/local/cuda')}")
        site = Path(torch.__file__).parents[1]
        nvrtc = sorted(glob.glob(str(site / "nvidia" / "*" / "lib" / "libnvrtc.so.*[0-9]")))
        args += [f"-DCUDA_nvrtc_LIBRARY={nvrtc[0]}"] if nvrtc else []
    return args


@pytest.fixture(scope="module")
def deploy_program(tmp_path_factory) -> Path:
    cmake = shutil.which("cmake")
    assert cmake, "the C++ example needs cmake (`pip install cmake`)"
    build = tmp_path_factory.mktemp("cpp_build")
    for step in (
        [cmake, "-S", str(EXAMPLE), "-B", str(build), *_cmake_args()],
        [cmake, "--build", str(build)],
    ):
        done = subprocess.run(step, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return build / "deploy"


@needs_extension
@pytest.mark.parametrize("dtype, tol", [("float32", 1e-6), ("float64", 1e-12)])
def test_cpp_example_runs_the_saved_models_as_python_does(deploy_program, tmp_path, dtype, tol):
    subprocess.run(
        [sys.executable, str(EXAMPLE / "export_model.py"), str(tmp_path), "--dtype", dtype],
        check=True,
        capture_output=True,
    )
    # The program runs with no Python around it: an environment without the interpreter's.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    done = subprocess.run(
        [str(deploy_program), str(tmp_path)], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    expected = torch.load(tmp_path / "expected.pt")
    # torch::jit::pickle_save tags the dict with its C++ type.
    with torch.serialization.safe_globals([torch.jit._pickle.restore_type_tag]):
        results = torch.load(tmp_path / "results.pt")
    devices = ["cpu"] + (["cuda"] if "cuda" in fused_lstm.native_backends() else [])
    for device in devices:
        for key, want in expected.items():
            torch.testing.assert_close(
                results[f"ts.{device}.{key}"], want, rtol=tol, atol=tol, msg=key
            )
            if key.startswith("out"):
                torch.testing.assert_close(
                    results[f"aoti.{device}.{key}"], want, rtol=tol, atol=tol, msg=key
                )
        # The saved model still trains: the SGD step the program took lowered the loss.
        assert results[f"ts.{device}.loss_after_step"] < results[f"ts.{device}.loss"]
    assert len(results) == len(devices) * (len(expected) + 5)
