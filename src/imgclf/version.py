"""imgclf's version, in a bottom-layer module of its own.

Any layer may read it from here; importing it from the package root instead would import the root's
re-exports, and through them the top layers (`lint-imports` reports that as a wrong-way import).
Keep it equal to `version` in pyproject.toml.
"""

from __future__ import annotations

import platform

__version__ = "0.1.0"


def library_versions() -> dict[str, str]:
    """The versions a bundle or checkpoint records: imgclf, torch, timm, numpy, Pillow and Python."""
    import numpy as np
    import PIL
    import timm
    import torch

    return {
        "imgclf": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "python": platform.python_version(),
    }
