"""``natten-mlx info``: versions, device, plugins, each backend, the support matrix and every reason."""

from __future__ import annotations

import platform
from importlib import metadata


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def info(out=print) -> None:
    import mlx.core as mx

    import natten_mlx
    from natten_mlx.plugins import registry
    from natten_mlx.support import FEATURES, get_support_matrix

    out(f"natten-mlx {natten_mlx.__version__}  (distribution: {_version('natten-mlx')})")
    out(f"mlx {mx.__version__}  default device: {mx.default_device()}  python {platform.python_version()} {platform.platform()}")
    out(f"pure strategy on this device: {_pure_strategy()}")
    out("plugins (entry-point group natten_mlx.backends):")
    for row in registry().plugins:
        out(f"  {row['name']:<24} {row['distribution']} {row['version']}  {row['status']}")
    rows = get_support_matrix()
    out("backends (highest priority first):")
    for r in rows:
        state = "available" if r["available"] is None else f"UNAVAILABLE: {r['available']}"
        out(f"  {r['name']} (priority {r['priority']}, {r['distribution']} {r['version']}): {state}")
        if r["description"]:
            out(f"    {r['description']}")
        how = f" (differentiation={r['differentiation']!r})" if r.get("differentiation") else ""
        devices = f"; devices: {', '.join(r['devices']) or 'none'}" if "devices" in r else ""
        out(f"    backward: {r['backward']}{how}{devices}")
    width = max(len(f) for f in FEATURES)
    names = [r["name"] for r in rows]
    cols = [max(len(n), 8) for n in names]
    out("support matrix (yes, or the backend's reason below):")
    out("  " + "feature".ljust(width) + "  " + "  ".join(n.ljust(c) for n, c in zip(names, cols)))
    reasons = []
    for f in FEATURES:
        cells = []
        for r, width_ in zip(rows, cols):
            why = r["features"][f]
            if why is None:
                cells.append("yes".ljust(width_))
            else:
                reasons.append(f"  [{len(reasons) + 1}] {r['name']} / {f}: {why}")
                cells.append(f"no [{len(reasons)}]".ljust(width_))
        out("  " + f.ljust(width) + "  " + "  ".join(cells))
    for line in reasons:
        out(line)


def _pure_strategy() -> str:
    from . import strategies

    try:
        chosen = strategies.here()
    except Exception as exc:  # info must still print the rest when the environment names a bad strategy
        return f"unknown ({type(exc).__name__}: {exc})"
    forced = strategies.forced_by_environment()
    how = "forced by the environment" if forced else "chosen for this device"
    return f"{chosen} ({how}; the others: {', '.join(s for s in strategies.names() if s != chosen)})"
