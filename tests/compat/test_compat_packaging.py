"""natten_mlx.compat as a subpackage contributed by a second distribution.

The compat distribution ships ``natten_mlx/compat/...`` and no ``natten_mlx/__init__.py``; core's
``natten_mlx/__init__.py`` extends its ``__path__`` (``pkgutil.extend_path``) so that both editable
and regular installs join the two. Without the compat distribution, importing
``natten_mlx.compat`` must raise an ImportError that says what to install.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap

import natten_mlx
import natten_mlx.compat
import pytest

COMPAT_SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "packages", "natten-mlx-compat", "src")


def test_compat_distribution_has_no_natten_mlx_init():
    assert os.path.isdir(os.path.join(COMPAT_SRC, "natten_mlx", "compat"))
    assert not os.path.exists(os.path.join(COMPAT_SRC, "natten_mlx", "__init__.py"))


@pytest.mark.parametrize("era, version", [("v014", "0.14.6"), ("v015", "0.15.1"), ("v017", "0.17.5"),
                                           ("v020", "0.20.1"), ("v021", "0.21.7")])
def test_eras_import(era, version):
    module = importlib.import_module(f"natten_mlx.compat.{era}")
    assert module.__version__ == version
    assert era in natten_mlx.compat.ERAS


def test_core_extends_its_path():
    """Core's ``__init__`` must extend ``__path__``: an editable core cannot reach a compat installed elsewhere otherwise."""
    init = os.path.join(os.path.dirname(natten_mlx.__file__), "__init__.py")
    with open(init, encoding="utf-8") as f:
        assert "extend_path" in f.read()


HIDE_COMPAT = textwrap.dedent(
    """
    import os, shutil, sys, tempfile
    import natten_mlx
    core = os.path.dirname(natten_mlx.__file__)
    if os.path.isdir(os.path.join(core, "compat")):  # a regular install shares core's directory: copy core without it
        copy = os.path.join(tempfile.mkdtemp(), "natten_mlx")
        shutil.copytree(core, copy, ignore=shutil.ignore_patterns("compat", "__pycache__"))
        core = copy
    natten_mlx.__path__[:] = [core]

    def provides_compat(finder):  # e.g. setuptools' editable finder of the compat distribution
        try:
            return finder.find_spec("natten_mlx.compat", natten_mlx.__path__) is not None
        except ImportError:
            return False

    sys.meta_path[:] = [f for f in sys.meta_path if not provides_compat(f)]
    try:
        import natten_mlx.compat
    except ImportError as e:
        print(type(e).__name__, e)
        sys.exit(0)
    sys.exit("natten_mlx.compat imported although hidden")
    """
)


def test_missing_distribution_says_what_to_install():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(natten_mlx.__file__)), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", HIDE_COMPAT], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    # installs that work today: the distribution is on no index yet (issue 8)
    assert "natten-mlx-compat" in done.stdout, done.stdout
    assert "pip install ./packages/natten-mlx-compat" in done.stdout, done.stdout
    assert '--find-links dist "natten-mlx[compat]' in done.stdout, done.stdout
