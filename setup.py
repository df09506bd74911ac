"""Builds the native library fused_lstm/libfused_lstm.so (the op schemas, the kernels and their
autograd, with no Python in it, for C++ programs too) and fused_lstm._C, the small Python module
over it. The library has the C++ (CPU) kernels always, the CUDA kernels when torch has CUDA and
a CUDA toolkit is found, or when FORCE_CUDA=1 (e.g. CI without a GPU). USE_CUDA=0 opts out.
TORCH_CUDA_ARCH_LIST picks the GPU architectures; without it and without a visible GPU we build
for sm_80 and sm_90 (A100, H100) and embed sm_90's PTX, which the driver compiles for newer GPUs
(Blackwell: sm_100, sm_120) that would otherwise find no kernel image.

FUSED_LSTM_NO_EXTENSION=1 builds nothing: a pure-PyTorch install, which runs the reference
(fused_lstm/reference.py). The same happens, with a warning, where no C++ compiler is found;
a compiler that is there and fails still fails the install.

FUSED_LSTM_BUILD_EMULATOR=1 also builds fused_lstm._emulated_cuda: the CUDA kernels compiled by
the host compiler against csrc/emulator, which runs them on the CPU for the tests
(fused_lstm.testing.emulated_cuda()). It needs no CUDA toolkit; users never call it, so a plain
install skips its compile."""

import glob
import os
import shlex
import shutil
import sys
import warnings

import torch
from setuptools import find_packages, setup
from torch.utils import cpp_extension
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_toolkit_ok() -> bool:
    home = cpp_extension.CUDA_HOME
    return home is not None and os.path.exists(os.path.join(home, "include", "cuda_runtime.h"))


def _build_cuda() -> bool:
    if os.environ.get("USE_CUDA", "1") == "0":
        return False
    if os.environ.get("FORCE_CUDA", "0") == "1":
        if not _cuda_toolkit_ok():
            raise RuntimeError(
                f"FORCE_CUDA=1 but no CUDA toolkit at CUDA_HOME={cpp_extension.CUDA_HOME!r}: "
                "set CUDA_HOME to the toolkit's root (the folder holding bin/nvcc and include/)"
            )
        return True
    if torch.version.cuda is None:
        return False
    if not _cuda_toolkit_ok():
        print(
            f"fused_lstm: no CUDA toolkit at CUDA_HOME={cpp_extension.CUDA_HOME!r}; building the "
            "CPU kernels only (set CUDA_HOME, or FORCE_CUDA=1, to build the CUDA ones)"
        )
        return False
    return True


def _pip_cuda_includes() -> list[str]:
    """torch's CUDA headers include cuBLAS/cuSPARSE/cuSOLVER headers. A minimal toolkit (nvcc and
    cudart only, as on CI) lacks them; torch's own nvidia-* wheels ship them. Searched after the
    toolkit's headers (-isystem), so a full toolkit always wins."""
    home = cpp_extension.CUDA_HOME
    if home and os.path.exists(os.path.join(home, "include", "cusparse.h")):
        return []
    site = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
    dirs = sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
    return [f for d in dirs for f in ("-isystem", d)]


LIBRARY = "fused_lstm.libfused_lstm"  # fused_lstm/libfused_lstm.so, named for C++ linkers


def _native_library():
    """The kernels, the C++ autograd and the schemas (TORCH_LIBRARY): a shared library with no
    Python in it, which a C++ program links (docs/deploying.md) and fused_lstm loads."""
    with_cuda = _build_cuda()
    sources = [
        os.path.relpath(p, ROOT)
        for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
        + sorted(glob.glob(os.path.join(ROOT, "csrc", "autograd", "*.cpp")))
        + sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    ]
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        # The step loops are one file per dtype and direction (csrc/cuda/instances/), so that
        # MAX_JOBS nvcc processes compile them in parallel.
        sources += [
            os.path.relpath(p, ROOT)
            for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
            + sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "instances", "*.cu")))
        ]
    ext = _with_openmp(CUDAExtension if with_cuda else CppExtension, LIBRARY, sources)
    # torch's extension helpers link libtorch_python, which needs libpython's symbols; the
    # library uses none of it. The soname is what a C++ program's DT_NEEDED records.
    ext.libraries.remove("torch_python")
    if sys.platform.startswith("linux"):
        ext.extra_link_args.append("-Wl,-soname,libfused_lstm.so")
        ext.extra_link_args += [f"-Wl,-rpath,{path}" for path in _run_paths(with_cuda)]
    return ext


def _run_paths(with_cuda: bool) -> list[str]:
    """Where a C++ program finds the library's dependencies (libc10_cuda, libcudart): its run
    path, as a program's own covers only the libraries it links itself. Beside the package in
    site-packages (torch's lib/, the nvidia wheels' libcudart), else where the build found
    them (an editable install)."""
    site = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
    dirs = [os.path.join(site, "torch", "lib")]
    if with_cuda:
        dirs += sorted(
            os.path.dirname(p)
            for p in glob.glob(os.path.join(site, "nvidia", "*", "lib", "libcudart.so*"))
        )
        dirs.append(os.path.join(cpp_extension.CUDA_HOME, "lib64"))
    relative = [
        "$ORIGIN/../" + os.path.relpath(d, site) for d in dirs if d.startswith(site + os.sep)
    ]
    return list(dict.fromkeys(relative + dirs))


def _python_module():
    """fused_lstm._C: the library's facts for Python (the tuning constants, the CPU's ISA), a
    module linked against the library (_BuildExtension adds it), which loads it."""
    return _with_openmp(CppExtension, "fused_lstm._C", ["csrc/python/module.cpp"])


def _with_openmp(kind, name: str, sources: list[str]):
    # -fopenmp: at::parallel_for is inline code that splits work across threads only where the
    # including file is compiled with OpenMP; without it every "parallel" step ran on one thread.
    # The link resolves to the libgomp.so.1 torch has already loaded (same soname), so torch's
    # thread pool and torch.set_num_threads govern ours. On macOS, Apple clang has no -fopenmp
    # of its own: its preprocessor takes the flag, and the kernels use the omp.h and libomp.dylib
    # that torch's wheels ship, the runtime torch has loaded (a second libomp aborts the
    # process). Without them (another torch build) the kernels run on one thread.
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__))
    torch_lib = os.path.join(torch_dir, "lib")
    if sys.platform.startswith("linux"):
        openmp = link = ["-fopenmp"]
    elif (
        sys.platform == "darwin"
        and os.path.exists(os.path.join(torch_dir, "include", "omp.h"))
        and os.path.exists(os.path.join(torch_lib, "libomp.dylib"))
    ):
        openmp = ["-Xpreprocessor", "-fopenmp"]
        link = [f"-L{torch_lib}", "-lomp", f"-Wl,-rpath,{torch_lib}"]
    else:
        print(
            "fused_lstm: no OpenMP for this platform and torch; the CPU kernels will run on one "
            "thread (fused_lstm._C.parallel_for_threads() says 1)"
        )
        openmp = link = []
    cxx = ["-O3", "-fno-math-errno", "-fno-trapping-math"] + openmp
    if kind is CppExtension:
        return kind(name, sources, extra_compile_args={"cxx": cxx}, extra_link_args=list(link))
    extra = _pip_cuda_includes()
    return kind(
        name,
        sources,
        extra_link_args=list(link),
        extra_compile_args={"cxx": cxx + extra, "nvcc": ["-O3", "-lineinfo"] + extra},
    )


class _BuildExtension(BuildExtension):
    def get_ext_filename(self, ext_name):
        # A plain library name (no Python ABI tag): the name C++ programs and CMake link by.
        # setuptools asks with the full name and with its last part.
        if ext_name.split(".")[-1] == LIBRARY.split(".")[-1]:
            return os.path.join(*ext_name.split(".")) + ".so"
        return super().get_ext_filename(ext_name)

    def build_extension(self, ext):
        if ext.name == "fused_lstm._C":
            # Linked by path; found beside _C at run time (both go to the package's folder).
            ext.extra_link_args.append(self.get_ext_fullpath(LIBRARY))
            origin = "@loader_path" if sys.platform == "darwin" else "$ORIGIN"
            ext.extra_link_args.append(f"-Wl,-rpath,{origin}")
        if ext.name != LIBRARY or sys.platform != "darwin":
            return super().build_extension(ext)
        # macOS links Python extensions as bundles, which nothing can link against: the library
        # is a dynamic library there instead (not yet built on macOS by this project's CI).
        linker = self.compiler.linker_so
        self.compiler.linker_so = ["-dynamiclib" if a == "-bundle" else a for a in linker]
        ext.extra_link_args.append("-Wl,-install_name,@rpath/libfused_lstm.so")
        try:
            super().build_extension(ext)
        finally:
            self.compiler.linker_so = linker


def _emulated_extension():
    sources = [
        "csrc/emulator/lstm_cuda_emulated.cpp",
        "csrc/emulator/emulator.cpp",
        "csrc/emulator/selftest_kernels.cpp",
    ]
    # -O1: the emulated kernels are for checking, and -O3 of the whole kernel set takes twice
    # as long to compile for little gain in the tests' run time.
    return CppExtension(
        "fused_lstm._emulated_cuda",
        sources,
        extra_compile_args={"cxx": ["-O1", "-DFUSED_LSTM_EMULATED", "-Wno-unknown-pragmas"]},
    )


def _compiler_found() -> bool:
    """Whether the C++ compiler torch's build calls (cpp_extension.get_cxx_compiler) is there."""
    return shutil.which(shlex.split(cpp_extension.get_cxx_compiler())[0]) is not None


def _extensions() -> list:
    if os.environ.get("FUSED_LSTM_NO_EXTENSION", "0") == "1":
        return []
    if not _compiler_found():
        warnings.warn(
            "fused_lstm: no C++ compiler found, so no native kernels are built: "
            "FusedLSTM will run the pure-PyTorch reference, which is much slower. "
            "Install a C++ compiler (g++ or clang++; Xcode's command line tools on "
            "macOS), then reinstall with `pip install --no-build-isolation .`."
        )
        return []
    emulator = os.environ.get("FUSED_LSTM_BUILD_EMULATOR", "0") == "1"
    return [_native_library(), _python_module()] + ([_emulated_extension()] if emulator else [])


setup(
    packages=find_packages(include=["fused_lstm", "fused_lstm.*"]),
    ext_modules=_extensions(),
    cmdclass={"build_ext": _BuildExtension},
    package_data={"fused_lstm": ["op_schemas.inc", "share/cmake/FusedLSTM/*.cmake"]},
)
