"""Errors shared across the package; imports nothing from fedmpi (a leaf of the import graph)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem, raised before training; ``key`` names the offending key."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)
