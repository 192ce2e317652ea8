"""Byte sizes for people, in decimal units as the Hub and disk tools show them: the one formatter of
messages (library errors and warnings) and of the CLI's tables."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """``512 B``, ``9.87 MB``, ``45.6 GB``: whole bytes, else two decimals under 10 and one above."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}" if abs(n) < 10 else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable: the last unit returns")
