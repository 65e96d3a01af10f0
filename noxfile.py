"""Every development task of natten-mlx.

    nox -s demo            the main job: install natten-mlx, train the demo classifier, print info, a quick benchmark
    nox -t ci              what CI runs (.ci/run): tests per interpreter and backend, parity (with NATTEN
                           0.21.7, and compat), plugins, parity014, the wheelhouse
    nox -s build           wheel and sdist of every distribution under packages/ into dist/
    nox -s wheelhouse      build, then install natten-mlx[compat] and every tier from dist/ into a fresh venv;
                           natten-mlx info and check there
    nox -s bench           the full benchmark against MLX SDPA and NATTEN 0.21.7; writes benchmarks/RESULTS.md
    nox -s parity014       compat parity against official NATTEN 0.14.6 (cached venv, ~20 min the first time)
    nox -s metal_emulator  the Metal tier's shipped kernels under the CPU emulator (CI)
    nox -s cuda_cpu        the CUDA tier without a GPU: nvcc compile of every variant, emulated kernels (CI)
    nox -s sanitize        the nanobind tier under ASan + UBSan (CI)
    nox -s distributed     sharded attention under mlx.launch -n 2 / -n 3 (ring) (CI)
    nox -s gpu             on a machine with a GPU: the core, parity and tier suites on the current interpreter
    nox -s lint            ruff

Interpreters: a session runs on the interpreter that runs nox when it is one of SUPPORTED, else on
the first of SUPPORTED found on PATH. The tests session runs the core on TEST_PYTHONS (the oldest
supported and the newest MLX ships wheels for that this machine has) and each CPU tier on the newest
(TEST_MATRIX). A missing interpreter is an error, never a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
PACKAGES = ROOT / "packages"
CORE = PACKAGES / "natten-mlx-core"
COMPAT = PACKAGES / "natten-mlx-compat"
NANOBIND = PACKAGES / "natten-mlx-nanobind"
CUDA = PACKAGES / "natten-mlx-cuda"
METAL = PACKAGES / "natten-mlx-metal"
EXAMPLE = ROOT / "examples" / "third-party-backend"
DIST = ROOT / "dist"
VERSION = "0.4.0"  # every distribution of this repository; see packages/*/pyproject.toml

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["demo"]
nox.options.error_on_missing_interpreters = True

SUPPORTED = ("3.10", "3.11", "3.12", "3.13")
TEST_PYTHONS = ["3.10", "3.13"]


def _works(python: str) -> bool:
    """True when ``python`` runs (a pyenv shim of a version that is not selected is on PATH but fails)."""
    exe = shutil.which(python)
    return exe is not None and subprocess.run([exe, "-c", ""], capture_output=True).returncode == 0


def _this_interpreter() -> str:
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if here in SUPPORTED:
        return here
    # none found: nox then reports SUPPORTED[0] as missing, an error
    return next((v for v in SUPPORTED if _works(f"python{v}")), SUPPORTED[0])


PYTHON = _this_interpreter()
# natten 0.14.6 builds only against torch 2.3.1, which has no wheels past Python 3.12
PARITY014_PYTHON = PYTHON if PYTHON != "3.13" else "3.12"

# torch 2.13.0 is the CPU build this project's machines carry; natten 0.21.7 builds against it (no CUDA)
TORCH = "torch==2.13.0"
NATTEN = "natten==0.21.7"
# backends the tests and parity sessions are run against (forcing NATTEN_BACKEND); the CPU tier
# joins when its package exists (cuda and metal need their device: see the gpu session)
BACKENDS = ["pure"] + (["nanobind"] if NANOBIND.is_dir() else [])
# (interpreter, backend) pairs of the tests session: the core on the oldest and the newest
# interpreter, each tier on the newest (a tier on every interpreter would double CI's longest part)
TEST_MATRIX = [(python, "pure") for python in TEST_PYTHONS] + [(TEST_PYTHONS[-1], b) for b in BACKENDS if b != "pure"]


def _tiers() -> list[Path]:
    """The tier packages that exist in this checkout."""
    return [p for p in (NANOBIND, CUDA, METAL) if (p / "pyproject.toml").is_file()]


def _distributions() -> list[Path]:
    """Every distribution under packages/ (tiers that do not exist yet are simply not listed)."""
    return sorted(p.parent for p in PACKAGES.glob("*/pyproject.toml"))


def _install_reference(session: nox.Session) -> None:
    """Official NATTEN 0.21.7 on the CPU, the parity reference."""
    session.install("setuptools>=68", "wheel", TORCH)
    session.install("--no-build-isolation", NATTEN)


def _install_core(session: nox.Session, backend: str, extra: str = "test") -> None:
    session.install(f"{CORE}[{extra}]")
    if backend == "nanobind":
        session.install(str(NANOBIND))


@nox.session(tags=["ci"])
@nox.parametrize("python,backend", TEST_MATRIX)
def tests(session: nox.Session, backend: str) -> None:
    """Core tests: the float64 oracle sweeps, validation, split ops, dtypes, the tools (demo, bench, check);
    with a tier's own tests when that tier is the backend."""
    _install_core(session, backend)
    paths = ["tests/core", "tests/test_demo_bench.py"]
    if backend == "nanobind":
        paths.append("tests/nanobind")
    session.run("pytest", "-q", *paths, *session.posargs, env={"NATTEN_BACKEND": backend})
    if backend == "nanobind" and _cpu_has("avx512f"):
        # the extension picks its widest kernel table; on an AVX-512 machine the AVX2 table (vector width 8,
        # what most x86 CPUs run) would otherwise go untested
        session.run("pytest", "-q", "tests/nanobind", *session.posargs,
                    env={"NATTEN_BACKEND": backend, "NATTEN_MLX_SIMD": "avx2"})


def _cpu_has(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return any(line.startswith("flags") and flag in line.split() for line in f)
    except OSError:
        return False


@nox.session(python=PYTHON, tags=["ci"])
@nox.parametrize("backend", BACKENDS)
def parity(session: nox.Session, backend: str) -> None:
    """Everything compared with official NATTEN 0.21.7 (CPU torch) in one venv (its install is the
    slow part): the core's parity tests and natten_mlx.compat, regular installs, then the packaging
    tests again on editable ones."""
    _install_core(session, backend)
    session.install(str(COMPAT))
    # a reused venv may hold the editable installs of the previous run: make these regular again
    session.install("--force-reinstall", "--no-deps", str(CORE), str(COMPAT))
    _install_reference(session)
    # the parity modules skip themselves without torch or natten: here they must be present
    session.run("python", "-c", "import natten, torch")
    env = {"NATTEN_BACKEND": backend}
    session.run("pytest", "-q", "tests/parity", "tests/compat", *session.posargs, env=env)
    session.install("--no-deps", "-e", str(CORE), "-e", str(COMPAT))
    session.run("pytest", "-q", "tests/compat/test_compat_packaging.py", "tests/compat/test_compat_v014.py",
                *session.posargs, env=env)


@nox.session(python=PYTHON, tags=["ci"])
def plugins(session: nox.Session) -> None:
    """The plugin contract, with the example third-party backend installed through its entry point;
    run for regular installs, then again for editable (PEP 660) ones. NATTEN_MLX_EXAMPLE_REQUIRED
    turns the example's tests from skipped into failing when it is missing."""
    env = {"NATTEN_MLX_EXAMPLE_REQUIRED": "1"}
    session.install(f"{CORE}[test]", str(EXAMPLE))
    session.run("pytest", "-q", "tests/plugins", *session.posargs, env=env)
    session.install("--no-deps", "-e", str(CORE), "-e", str(EXAMPLE))
    session.run("pytest", "-q", "tests/plugins", *session.posargs, env=env)


@nox.session(python=PYTHON)
def compat(session: nox.Session) -> None:
    """natten_mlx.compat alone (CI runs it inside ``parity``); regular installs, then editable ones."""
    session.install(f"{CORE}[test]", str(COMPAT))
    session.install("--force-reinstall", "--no-deps", str(CORE), str(COMPAT))
    _install_reference(session)
    session.run("pytest", "-q", "tests/compat", *session.posargs)
    session.install("--no-deps", "-e", str(CORE), "-e", str(COMPAT))
    session.run(
        "pytest", "-q", "tests/compat/test_compat_packaging.py", "tests/compat/test_compat_v014.py", *session.posargs
    )


def _cache_dir() -> Path:
    """Outside the checkout, so a fresh clone (CI) reuses what an earlier run built."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "natten-mlx"


@nox.session(python=PARITY014_PYTHON, tags=["ci"])
def parity014(session: nox.Session) -> None:
    """Parity of the v014/v015 eras with official NATTEN 0.14.6, which builds only against torch 2.3.1.

    Its virtualenv is kept between runs, outside the checkout, at ``$NATTEN014_VENV`` (default
    ``~/.cache/natten-mlx/natten014-py<version>``); the first run downloads torch 2.3.1 and compiles
    NATTEN (about 20 minutes on 2 cores), later runs only reinstall natten-mlx into it.
    """
    default = _cache_dir() / f"natten014-py{session.python}"
    venv = Path(os.environ.get("NATTEN014_VENV", default))
    python = venv / "bin" / "python"
    if not python.exists():
        session.run("python", "-m", "venv", str(venv))
    pip = (str(python), "-m", "pip", "install", "-q")
    probe = "import importlib.metadata as m\ntry:\n    print(m.version('natten'))\nexcept m.PackageNotFoundError:\n    print('none')"
    found = session.run(str(python), "-c", probe, silent=True, external=True).strip().splitlines()[-1]
    if found != "0.14.6":
        session.run(*pip, "torch==2.3.1", "numpy<2", "setuptools", "wheel", "mlx[cpu]", "pytest", external=True)
        session.run(*pip, "--no-build-isolation", "natten==0.14.6", external=True, env={"MAX_JOBS": "2"})
    # the core's dependencies without upgrading numpy past torch 2.3.1's; then this checkout's packages
    session.run(*pip, "numpy<2", "pluggy>=1.3", "mlx[cpu]", external=True)
    session.run(*pip, "--no-deps", "--force-reinstall", str(CORE), str(COMPAT), external=True)
    session.run(str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/compat/test_parity014.py",
                *session.posargs, external=True)


@nox.session(python=PYTHON)
def build(session: nox.Session) -> None:
    """Wheel and sdist of every distribution under packages/ into dist/ (previous files of these
    distributions are removed first)."""
    _build(session)


def _build(session: nox.Session) -> None:
    session.install("build")
    DIST.mkdir(exist_ok=True)
    for old in DIST.glob("natten_mlx*"):
        old.unlink()
    for package in _distributions():
        # the sdist step writes build/ and src/*.egg-info into the source tree: remove what it added
        before = set(package.glob("build")) | set(package.glob("src/*.egg-info"))
        # --sdist --wheel: both from the source tree (a wheel built from the nanobind sdist would lack
        # window.h, which lives in the core package: see packages/natten-mlx-nanobind/README.md)
        session.run("python", "-m", "build", "--sdist", "--wheel", "--outdir", str(DIST), str(package))
        for left in (set(package.glob("build")) | set(package.glob("src/*.egg-info"))) - before:
            shutil.rmtree(left)
    session.log("dist/: " + ", ".join(sorted(p.name for p in DIST.iterdir())))


@nox.session(python=PYTHON, tags=["ci"])
def wheelhouse(session: nox.Session) -> None:
    """Install from dist/ as a user would (``--find-links dist``, everything else from the index) into
    this session's fresh venv: natten-mlx with [compat] and every tier that exists; then
    ``natten-mlx info`` (each tier listed with its distribution) and ``natten-mlx check``.

    ``[cuda]`` also pulls MLX's CUDA build (a large download that needs an NVIDIA GPU), so the CUDA
    tier's wheel is installed by name here; it installs anywhere and reports itself unavailable.
    """
    _build(session)
    extras = ["compat"] + [p.name.removeprefix("natten-mlx-") for p in _tiers() if p != CUDA]
    requirements = [f"natten-mlx[{','.join(extras)}]=={VERSION}"]
    if CUDA in _tiers():
        requirements.append(f"natten-mlx-cuda=={VERSION}")
    # --force-reinstall: the wheels of this version were just rebuilt; pip's cache must not win
    session.install("--force-reinstall", "--find-links", str(DIST), *requirements)
    # from dist/, not from the checkout: run outside it
    site = session.run("python", "-c", "import natten_mlx, os; print(os.path.dirname(natten_mlx.__file__))",
                       silent=True).strip().splitlines()[-1]
    if str(PACKAGES) in site:
        session.error(f"natten_mlx was imported from the source tree ({site}), not from the installed wheel")
    version = session.run("python", "-c", "import natten_mlx; print(natten_mlx.__version__)", silent=True)
    if version.strip().splitlines()[-1] != VERSION:
        session.error(f"natten_mlx.__version__ is {version.strip()!r}, the distributions are {VERSION}")
    info = session.run("natten-mlx", "info", silent=True)
    print(info)
    for tier in _tiers():
        if tier.name not in info:
            session.error(f"natten-mlx info does not list the distribution {tier.name}")
    session.run("python", "-c", "import natten_mlx.compat.v021 as natten; print('natten_mlx.compat', natten.__version__)")
    session.run("natten-mlx", "check", "--cases", "20")


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """The main job for a newcomer: train the NAT demo classifier, print info, run a quick benchmark."""
    session.install(f"{CORE}[demo]")
    session.run("natten-mlx", "demo", *session.posargs)
    session.run("natten-mlx", "bench", "--quick")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """The benchmark suite (natten-mlx backends, MLX SDPA with a mask, NATTEN 0.21.7 on the CPU)."""
    session.install(str(CORE))
    _install_reference(session)
    session.run("python", "benchmarks/run_benchmarks.py", *session.posargs)


@nox.session(python=PYTHON, tags=["ci"] if (ROOT / "tests" / "metal").is_dir() else [])
def metal_emulator(session: nox.Session) -> None:
    """The Metal tier without an Apple GPU: the kernels it ships, run by the CPU emulator of
    packages/natten-mlx-metal/emulator (needs g++): the emulator's planted-bug tests, then every
    kernel variant against the float64 oracle, forward and backward. Compiled kernels are cached
    outside the checkout (~/.cache/natten-mlx/metal-emulator), keyed by their source's hash."""
    session.install(f"{CORE}[test]", str(METAL))
    env = {"NATTEN_MLX_METAL_EMU_CACHE": str(_cache_dir() / "metal-emulator")}
    session.run("pytest", "-q", "tests/metal", *session.posargs, env=env)


@nox.session(python=PYTHON, tags=["ci"] if (ROOT / "tests" / "cuda").is_dir() else [])
def cuda_cpu(session: nox.Session) -> None:
    """The CUDA tier without a GPU: tiling.h against the oracle (g++), every kernel variant the backend
    can dispatch through nvcc -arch=sm_90 (system nvcc or $NVCC; those tests skip without one), and the
    kernels' exact source in the CPU emulator against the float64 oracle, alone and behind the core."""
    session.install(f"{CORE}[test]")
    session.install("--no-deps", str(CUDA))
    session.run("pytest", "-q", "tests/cuda", *session.posargs)


@nox.session(python=PYTHON, tags=["ci"] if (ROOT / "tests" / "aarch64").is_dir() else [])
def nanobind_aarch64(session: nox.Session) -> None:
    """The nanobind tier's aarch64 build (its NEON kernel table, which x86 machines never run): driver.cpp
    and kernels.cpp cross-compiled by GCC and by clang (as macOS builds) into a harness run under qemu-aarch64,
    against the float64 oracle (fused forward and backward, split ops). The tests skip, saying why, without
    the cross compiler, clang and qemu-user (Debian: crossbuild-essential-arm64 qemu-user clang; .ci/run
    installs them where it can). The harness is cached outside the checkout (~/.cache/natten-mlx/cross), keyed by its sources."""
    session.install(f"{CORE}[test]")
    env = {"NATTEN_MLX_CROSS_CACHE": str(_cache_dir() / "cross")}
    session.run("pytest", "-q", "-rs", "tests/aarch64", *session.posargs, env=env)


@nox.session(python=PYTHON, tags=["ci"] if NANOBIND.is_dir() else [])
def sanitize(session: nox.Session) -> None:
    """The nanobind tier built with AddressSanitizer + UndefinedBehaviorSanitizer, its own tests run
    under them (libasan and libstdc++ preloaded into Python; leak reports off: CPython's own
    allocations make them noise). Any ASan/UBSan report aborts the run."""
    session.install(f"{CORE}[test]")
    session.install("--no-cache-dir", "--force-reinstall", "--no-deps", str(NANOBIND),
                    env={"NATTEN_MLX_SANITIZE": "ON"})

    def lib(name: str) -> str:
        return subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()

    env = {
        "LD_PRELOAD": f"{lib('libasan.so')} {lib('libstdc++.so')}",
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1",
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
        "NATTEN_BACKEND": "nanobind",
    }
    # the sanitized extension only imports with libasan preloaded: check it under the same environment
    session.run("python", "-c", "import natten_mlx_nanobind._build_info as b; "
                "assert str(b.SANITIZE).upper() in ('ON', 'TRUE', '1'), 'not a sanitized build'", env=env)
    session.run("pytest", "-q", "-p", "no:cacheprovider", "tests/nanobind", *session.posargs, env=env)


@nox.session(python=PYTHON, tags=["ci"] if (ROOT / "tests" / "distributed").is_dir() else [])
def distributed(session: nox.Session) -> None:
    """Sharded attention over mx.distributed."""
    session.install(f"{CORE}[test]")
    session.run("pytest", "-q", "tests/distributed", *session.posargs)


@nox.session(venv_backend="none")
def gpu(session: nox.Session) -> None:
    """On the lent GPU machine (no network; MLX from the carried wheels, see shared/device/README.md),
    with the interpreter that runs nox: install the core, compat and the CUDA tier without
    dependencies (editable, into that interpreter), then the core, parity and CUDA suites."""
    packages = [CORE, COMPAT] + ([CUDA] if CUDA in _tiers() else [])
    editable = [a for p in packages for a in ("-e", str(p))]
    session.run(sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", *editable)
    paths = ["tests/core", "tests/parity"] + (["tests/cuda"] if (ROOT / "tests" / "cuda").is_dir() else [])
    session.run(sys.executable, "-m", "pytest", "-q", *paths, *session.posargs)


# in CI too (about 10 s): an unused import from the nanobind fifth pass landed because only people ran it
@nox.session(python=PYTHON, tags=["ci"])
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "packages", "tests", "benchmarks", "noxfile.py")
