"""Every development task of natten-mlx.

    nox -s demo            the main job: install natten-mlx, train the demo classifier, print info, a quick benchmark
    nox -t ci              what CI runs: tests (per backend), plugins, compat
    nox -s bench           the full benchmark against MLX SDPA and NATTEN 0.21.7; writes benchmarks/RESULTS.md
    nox -s parity014       compat parity against official NATTEN 0.14.6 (own venv, ~20 min the first time)
    nox -s lint            ruff
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
CORE = ROOT / "packages" / "natten-mlx-core"
COMPAT = ROOT / "packages" / "natten-mlx-compat"
EXAMPLE = ROOT / "examples" / "third-party-backend"

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["demo"]

PYTHON = "3.11"
# torch 2.13.0 is the CPU build this project's machines carry; natten 0.21.7 builds against it (no CUDA)
TORCH = "torch==2.13.0"
NATTEN = "natten==0.21.7"
# backends the tests session is run against (forcing NATTEN_BACKEND); tiers add themselves here
BACKENDS = ["pure"]


def _install_reference(session: nox.Session) -> None:
    """Official NATTEN 0.21.7 on the CPU, the parity reference."""
    session.install("setuptools>=68", "wheel", TORCH)
    session.install("--no-build-isolation", NATTEN)


@nox.session(python=PYTHON, tags=["ci"])
@nox.parametrize("backend", BACKENDS)
def tests(session: nox.Session, backend: str) -> None:
    """Core tests: the float64 oracle sweeps, validation, split ops, dtypes, NATTEN parity, demo/bench smoke."""
    session.install(f"{CORE}[test]")
    _install_reference(session)
    env = {"NATTEN_BACKEND": backend}
    session.run("pytest", "-q", "tests/core", "tests/parity", "tests/test_demo_bench.py", *session.posargs, env=env)


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


@nox.session(python=PYTHON, tags=["ci"])
def compat(session: nox.Session) -> None:
    """natten_mlx.compat eras against official NATTEN 0.21.7; regular installs, then editable ones."""
    session.install(f"{CORE}[test]", str(COMPAT))
    # a reused venv may hold the editable installs of the previous run: make these regular again
    session.install("--force-reinstall", "--no-deps", str(CORE), str(COMPAT))
    _install_reference(session)
    session.run("pytest", "-q", "tests/compat", *session.posargs)
    session.install("--no-deps", "-e", str(CORE), "-e", str(COMPAT))
    session.run(
        "pytest", "-q", "tests/compat/test_compat_packaging.py", "tests/compat/test_compat_v014.py", *session.posargs
    )


@nox.session(python=PYTHON)
def parity014(session: nox.Session) -> None:
    """Parity of the v014/v015 eras with official NATTEN 0.14.6, which builds only against torch 2.3.1.

    Its virtualenv is kept between runs at ``$NATTEN014_VENV`` (default ``.nox/natten014``); the
    first run downloads torch 2.3.1 and compiles NATTEN (about 20 minutes on 2 cores).
    """
    venv = Path(os.environ.get("NATTEN014_VENV", ROOT / ".nox" / "natten014"))
    python = venv / "bin" / "python"
    if not python.exists():
        session.run("python", "-m", "venv", str(venv))
    pip = (str(python), "-m", "pip", "install", "-q")
    session.run(*pip, "torch==2.3.1", "numpy<2", "setuptools", "wheel", "mlx[cpu]", "pytest", external=True)
    probe = "import importlib.metadata as m\ntry:\n    print(m.version('natten'))\nexcept m.PackageNotFoundError:\n    print('none')"
    found = session.run(str(python), "-c", probe, silent=True, external=True).strip().splitlines()[-1]
    if found != "0.14.6":
        session.run(*pip, "--no-build-isolation", "natten==0.14.6", external=True, env={"MAX_JOBS": "2"})
    session.run(*pip, "-e", str(CORE), "-e", str(COMPAT), external=True)
    session.run(str(python), "-m", "pytest", "-q", "tests/compat/test_parity014.py", *session.posargs, external=True)


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


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "packages", "tests", "benchmarks", "noxfile.py")
