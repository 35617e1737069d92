"""Reaching the Hugging Face Hub: go offline at once when it can't be reached, and turn a failed load
into one line. Hub ids stay what users type; only the failure path is ours."""
from __future__ import annotations

import os
import socket
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

from .errors import RecipeError

OFFLINE_HINT = ("If you are offline, it must already be in the Hugging Face cache or a local folder; "
                "`recipes/tiny_alpaca.yaml` runs fully offline.")


@lru_cache(maxsize=1)
def offline_if_unreachable(timeout: float = 3.0) -> bool:
    """Probe the Hub once. Unreachable -> offline mode for this process, so cached files still load and
    nothing waits through retries. Returns True when offline."""
    import datasets.config
    import huggingface_hub.constants as hf

    if hf.HF_HUB_OFFLINE:
        return True
    host = urlparse(hf.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return False
    except OSError:
        os.environ["HF_HUB_OFFLINE"] = "1"
        hf.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
        return True


def looks_like_path(name: str) -> bool:
    """A local path rather than a Hub id (`org/name`): explicit path syntax, or a first folder that exists here
    (`runs/nope` when there is a `runs/`)."""
    parts = Path(name).parts
    return (name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1
            or (len(parts) > 1 and Path(parts[0]).is_dir()))


def from_pretrained(loader, name: str, **kwargs):
    """`loader.from_pretrained(name)`, with an unreachable or missing model as one clear line."""
    name = os.path.expanduser(name)  # the loaders take `~` literally
    if not Path(name).exists():
        if looks_like_path(name):
            raise RecipeError(f"{name}: model folder not found (relative paths start from {Path.cwd()})")
        offline_if_unreachable()
    try:
        return loader.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = "" if Path(name).exists() else f" {OFFLINE_HINT}"
        raise RecipeError(f"could not load '{name}': {first}{hint}") from None
