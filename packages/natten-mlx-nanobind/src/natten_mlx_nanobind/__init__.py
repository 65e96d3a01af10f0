"""natten-mlx's compiled CPU tier: neighborhood attention as C++ MLX primitives.

The extension ``_ext`` holds one MLX ``Primitive`` for six ops (fused forward ``(out, lse)`` and its
vjp, split ``qk``/``av`` and their vjps), 1D/2D/3D, float32/float16/bfloat16 (float32 arithmetic).
It is built against one exact MLX version (the C++ API changes between patch releases); under
another MLX it is not imported, and :data:`UNAVAILABLE` says why and how to rebuild.

Build notes: ``window.h`` comes from the core (``-C cmake.define.NATTEN_MLX_INCLUDE=<dir>``, else the
repository's ``packages/natten-mlx-core``, else an importable ``natten_mlx``); ASan+UBSan builds with
``NATTEN_MLX_SANITIZE=ON`` in the environment of ``pip install``.

Environment: ``NATTEN_MLX_NUM_THREADS`` (kernel threads; default: the CPUs this process may use),
``NATTEN_MLX_SIMD`` (``avx512``, ``avx2`` or ``base``: force a kernel variant), ``NATTEN_MLX_POOL_MB`` (output
buffers kept for reuse on CPU-only MLX builds, default 1024 MB, 0 = none; ``extension().pool_clear()`` frees
them). The package README lists the rest.
"""

from __future__ import annotations

__version__ = "0.4.0"

_module = None
UNAVAILABLE: str | None = None


def _load():
    global _module, UNAVAILABLE
    import mlx.core as mx  # the extension's types live in mlx.core's nanobind domain: import it first

    try:
        from ._build_info import MLX_VERSION as built
    except ImportError:
        built = None
    running = mx.__version__
    rebuild = "rebuild it: pip install --force-reinstall --no-cache-dir --no-binary natten-mlx-nanobind natten-mlx-nanobind (or packages/natten-mlx-nanobind from the repository)"
    if built is None:
        UNAVAILABLE = "natten-mlx-nanobind has no compiled extension in this installation (_build_info missing); " + rebuild
        return
    if built != running:
        UNAVAILABLE = (
            f"natten-mlx-nanobind was compiled against MLX {built}, but MLX {running} is installed; the MLX C++ API "
            f"changes between releases, so install mlx=={built} or {rebuild}"
        )
        return
    try:
        from . import _ext as ext
    except ImportError as exc:
        UNAVAILABLE = f"natten-mlx-nanobind's extension failed to load under MLX {running} (built for {built}): {exc}; {rebuild}"
        return
    _module = ext


_load()


def extension():
    """The compiled module; raises RuntimeError with :data:`UNAVAILABLE` when it cannot load."""
    if _module is None:
        raise RuntimeError(UNAVAILABLE)
    return _module
