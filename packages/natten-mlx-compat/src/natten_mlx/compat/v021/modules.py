"""``natten.modules`` of NATTEN 0.21.7 (shared with the other 0.2x era: see ``_modern_modules``)."""

from __future__ import annotations

from .._modern_modules import *  # noqa: F401,F403
from .._modern_modules import __all__  # noqa: F401
