"""Where lorakit keeps what it can rebuild: `$LORAKIT_CACHE_DIR`, else `$XDG_CACHE_HOME/lorakit`, else
`~/.cache/lorakit`. The preprocessing cache (lorakit.data.cache) and converted GGUF bases
(lorakit.model.gguf) live under it; everything there is safe to delete.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    if os.environ.get("LORAKIT_CACHE_DIR"):
        return Path(os.environ["LORAKIT_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lorakit"
