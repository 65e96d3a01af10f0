"""``natten.context`` of NATTEN 0.21.7 (shared with the other 0.2x era: see ``_modern_context``)."""

from __future__ import annotations

from .._modern_context import *  # noqa: F401,F403
from .._modern_context import __all__  # noqa: F401
