"""Sizes of memory as people write them (`2G`, `300M`, `1.5GiB`) and as they are shown."""

from __future__ import annotations

import re

from tbss_queue.errors import ConfigError

_UNITS = {"": 2**20, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
"""Binary units, as Slurm's --mem and HTCondor's request_memory read them; a bare number is
MiB (Slurm's default unit)."""


def parse_size(text: str, option: str = "--mem") -> int:
    """'2G', '300M', '1.5GiB', '512' (MiB) -> bytes; ConfigError naming `option` otherwise."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if found is None or float(found.group(1)) <= 0:
        raise ConfigError(f"{option} {text!r}: expected a size like 300M, 2G or 1.5GiB")
    return int(float(found.group(1)) * _UNITS[found.group(2).upper()])


def human(size: float) -> str:
    """Bytes as people read them: '4 GiB', '300 MiB', '1.5 GiB'."""
    for unit, factor in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= factor:
            return f"{size / factor:.3g} {unit}"
    return f"{int(size)} B"
