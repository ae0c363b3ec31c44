"""Parse and format the quantities users type: memory sizes, durations, amounts.

Why not pydantic's ``ByteSize`` and ``humanize``: ``ByteSize`` reads a unitless string
as bytes (``"8"`` is refused here: the seed CLI meant gigabytes) and refuses ``"1e3MiB"``;
``humanize`` writes "29 minutes", too wide for the boost table's columns; neither parses "30m".

Example:
    >>> parse_memory("4GiB")
    4294967296
    >>> parse_duration("30m")
    1800.0
    >>> format_bytes(4 * 2**30), format_duration(1740)
    ('4 GiB', '29 min')
"""

from __future__ import annotations

import math
import re

_MEMORY_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
}
_DURATION_UNITS = {
    "": 1,
    "s": 1,
    "sec": 1,
    "secs": 1,
    "second": 1,
    "seconds": 1,
    "m": 60,
    "min": 60,
    "mins": 60,
    "minute": 60,
    "minutes": 60,
    "h": 3600,
    "hr": 3600,
    "hrs": 3600,
    "hour": 3600,
    "hours": 3600,
    "d": 86400,
    "day": 86400,
    "days": 86400,
}
_QUANTITY = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def check_amount(value: float, what: str, *, allow_zero: bool = True) -> float:
    """Return ``value`` as a float, or raise ValueError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number, got {value!r}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond float range, e.g. 10**400
        raise ValueError(f"{what} must be finite, got a number with {len(str(abs(value)))} digits") from None
    if math.isnan(value):
        raise ValueError(f"{what} must be a number, got NaN")
    if math.isinf(value):
        raise ValueError(f"{what} must be finite, got {value}")
    if value < 0:
        raise ValueError(f"{what} must not be negative, got {value:g}")
    if value == 0 and not allow_zero:
        raise ValueError(f"{what} must be greater than zero")
    return value


def parse_number(text: str | float | int, what: str) -> float:
    """Parse a plain number typed on a command line, e.g. ``"2"`` or ``"0.5"``."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return check_amount(text, what)
    try:
        value = float(str(text).strip())
    except ValueError:
        raise ValueError(f"{what} must be a number, got {text!r}") from None
    return check_amount(value, what)


def _plain_number(text: str) -> float | None:
    """``"-5"``, ``"nan"``, ``"1e3"`` as a float, so they get the precise error; else None."""
    try:
        return float(text.strip())
    except ValueError:
        return None


def parse_memory(value: str | int | float | None, what: str = "memory") -> int:
    """Bytes from an int (bytes) or a string with a unit such as ``"4GiB"``, ``"512MiB"``, ``"2GB"``.

    A string without a unit is refused: the seed's CLI read ``memory 8`` as gigabytes, bytes
    would be a silent surprise, so bytes are accepted only as an explicit number."""
    if value is None:
        return 0
    if isinstance(value, str) and _plain_number(value) is not None:
        number = _plain_number(value)
        if number and math.isfinite(number) and number > 0:
            raise ValueError(f"{what} {value.strip()!r} has no unit: write e.g. '{value.strip()}GiB' or "
                             f"'{value.strip()}MiB' (bytes only as a number, not text)")
        value = number
    if isinstance(value, str):
        match = _QUANTITY.match(value)
        if not match or match.group(2).lower() not in _MEMORY_UNITS:
            raise ValueError(
                f"{what} must be bytes or a size like '4GiB' or '512MiB', got {value!r}"
            )
        number = check_amount(float(match.group(1)), what)
        return int(round(check_amount(number * _MEMORY_UNITS[match.group(2).lower()], what)))
    return int(round(check_amount(value, what)))


def parse_duration(value: str | int | float, what: str = "duration") -> float:
    """Seconds from a number (seconds) or a string such as ``"30m"``, ``"2h"``, ``"90s"``."""
    if isinstance(value, str) and _plain_number(value) is not None:
        value = _plain_number(value)
    if isinstance(value, str):
        match = _QUANTITY.match(value)
        if not match or match.group(2).lower() not in _DURATION_UNITS:
            raise ValueError(
                f"{what} must be seconds or a duration like '30m', '2h' or '90s', got {value!r}"
            )
        number = check_amount(float(match.group(1)), what)
        return check_amount(number * _DURATION_UNITS[match.group(2).lower()], what)
    return check_amount(value, what)


def format_bytes(n: int | float) -> str:
    """Human size with binary units: ``4 GiB``, ``512 MiB``, ``0 B``."""
    n = float(n)
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        # Also promote when the smaller unit would print as 1024.0 (1024**2 - 1 B is 1.0 MiB).
        if n >= size or round(n / (size / 1024), 1) >= 1024:
            value = n / size
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n:.0f} B"


NO_VALUE = "—"  # what an empty artifact cell shows: the Prefect UI renders a lone "-" as a list bullet


def format_amount(value: float) -> str:
    """``2`` rather than ``2.0``; ``0.5`` stays ``0.5``."""
    return f"{value:g}"


def format_duration(seconds: float) -> str:
    """Short human duration: ``45 s``, ``29 min``, ``2 h 5 min``, ``3 d 4 h``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, _ = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"
