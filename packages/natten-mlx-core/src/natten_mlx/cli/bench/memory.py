"""How much memory the dense baseline may take, and how much it needs."""

from __future__ import annotations

import mlx.core as mx

from .cases import Case


def available_bytes() -> int | None:
    """Memory the dense baseline may use: the GPU's, or the CPU's available memory; None if unknown."""
    try:
        if mx.default_device() == mx.gpu:
            info = mx.device_info()
            return int(info.get("memory_size", 0)) or None
    except Exception:  # device_info differs across MLX builds; unknown is a valid answer
        pass
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def dense_bytes(case: Case, mode: str) -> int:
    """Rough peak of the dense baseline: score-sized float32 buffers plus the boolean mask."""
    n = case.tokens
    buffers = 3 if mode == "fwd" else 7
    return case.batch * case.heads * n * n * 4 * buffers + n * n


def too_big(case: Case, mode: str, limit: int | None = None) -> str | None:
    """A reason to skip the dense baseline of ``case`` (more than 60% of ``limit`` bytes), or None."""
    limit = available_bytes() if limit is None else limit
    need = dense_bytes(case, mode)
    if limit is not None and need > 0.6 * limit:
        return f"skipped: needs ~{need / 2**30:.1f} GiB for dense {case.heads}x{case.tokens}^2 scores"
    return None
