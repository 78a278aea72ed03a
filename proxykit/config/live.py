"""What a running proxykit needs to take a new config: the file it came from, watched for
changes, and the fields that only a restart can change.

    source = ConfigFile("proxykit.yaml")
    if source.changed(): config = source.load()      # ConfigError names every problem
    config, warnings = keep_restart_only(running, config)
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path
from typing import Final

from proxykit.config.model import Config
from proxykit.config.reader import load_config

# Fields read once at start (CONTRACT section 3): a change waits for the next restart.
RESTART_ONLY: Final = ("limits.backend", "limits.redis_url", "store.url", "management.path", "metrics.path")


class ConfigFile:
    """A config file and what it held when last read. A change is a new inode, size or mtime
    (an atomic rename, a Kubernetes ConfigMap's symlink swap, an edit in place) whose bytes
    differ from the last read."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._stat = self._fingerprint()
        self._digest = self._read_digest()

    def changed(self) -> bool:
        """Whether the file changed since the last call (or since it was made)."""
        stat = self._fingerprint()
        if stat == self._stat:
            return False
        self._stat = stat
        digest = self._read_digest()
        if digest == self._digest:
            return False
        self._digest = digest
        return True

    def load(self) -> Config:
        return load_config(self.path)

    def _fingerprint(self) -> tuple[int, int, int] | None:
        try:
            stat = os.stat(self.path)  # follows the symlink: a swapped target is a new inode
        except OSError:
            return None
        return stat.st_ino, stat.st_size, stat.st_mtime_ns

    def _read_digest(self) -> str | None:
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            return None


def keep_restart_only(running: Config, new: Config) -> tuple[Config, list[str]]:
    """`new`, with the fields only a restart may change kept as they run; a warning for each
    that differs."""
    warnings = []
    for path in RESTART_ONLY:
        section, name = path.split(".")
        old_value, new_value = getattr(getattr(running, section), name), getattr(getattr(new, section), name)
        if old_value != new_value:
            warnings.append(f"{path} changed: it takes effect at the next restart")
            new = replace(new, **{section: replace(getattr(new, section), **{name: old_value})})
    return new, warnings
