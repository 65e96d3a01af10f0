"""natten-mlx: neighborhood attention (NATTEN's operator) for Apple's MLX.

Heads-last functional API (``na1d/na2d/na3d``, split ``na*d_qk``/``na*d_av``, ``merge_attentions``,
``na_subdomain`` for sharded attention), ``mlx.nn`` modules, and a plugin system of backends
(entry-point group ``natten_mlx.backends``; the contract is :mod:`natten_mlx.protocol`, the tables
a backend may use are :mod:`natten_mlx.geometry`).
"""

from pkgutil import extend_path

# natten_mlx.compat comes from the separate distribution natten-mlx-compat
__path__ = extend_path(__path__, __name__)


class _CompatHint:
    """Last on sys.meta_path: reached for ``natten_mlx.compat`` only when no distribution provides
    it, so the ImportError can say what to install. Submodules are left alone (a wrong era name
    must not claim compat is missing)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "natten_mlx.compat":
            from .version import __version__

            raise ModuleNotFoundError(
                "No module named 'natten_mlx.compat': NATTEN's era APIs are the separate distribution "
                "natten-mlx-compat; from a clone: pip install ./packages/natten-mlx-compat; from a wheelhouse "
                f'(nox -s build): pip install --find-links dist "natten-mlx[compat]=={__version__}"',
                name=fullname,
            )
        return None


def _install_compat_hint() -> None:
    import sys

    if not any(type(f).__name__ == "_CompatHint" for f in sys.meta_path):
        sys.meta_path.append(_CompatHint())


_install_compat_hint()

from .dispatch import configure, explain_problem, get_backend, list_backends, use_backend  # noqa: E402
from .explain import explain  # noqa: E402
from .functional import (  # noqa: E402
    merge_attentions,
    na1d,
    na1d_av,
    na1d_qk,
    na2d,
    na2d_av,
    na2d_qk,
    na3d,
    na3d_av,
    na3d_qk,
    na_subdomain,
)
from .hookspecs import hookimpl, hookspec  # noqa: E402
from .modules import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D  # noqa: E402
from .plugins import register_backend, reload_plugins, unregister_backend  # noqa: E402
from .problem import Problem  # noqa: E402
from .protocol import BackwardRecord  # noqa: E402
from .support import get_support_matrix  # noqa: E402
from .version import __version__  # noqa: E402

__all__ = [
    "na1d", "na2d", "na3d", "na1d_qk", "na2d_qk", "na3d_qk", "na1d_av", "na2d_av", "na3d_av",
    "merge_attentions", "na_subdomain", "NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D",
    "use_backend", "list_backends", "get_backend", "explain", "explain_problem", "get_support_matrix",
    "register_backend", "unregister_backend", "reload_plugins", "hookimpl", "hookspec", "Problem",
    "BackwardRecord", "configure", "geometry", "__version__",
]

from . import geometry  # noqa: E402

# discovery happens now, at import (a broken plugin warns here, never raises)
from .plugins import registry as _registry  # noqa: E402

_registry()
