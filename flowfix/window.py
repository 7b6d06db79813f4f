"""``--window``: how far apart in time an import and its master flow may have been created.

Accepts ``90s``, ``30m``, ``2h``, ``1d`` (and combinations such as ``1h30m``) or ISO-8601
durations such as ``PT2H`` / ``P1DT12H``. Zero, negative, or malformed values are errors.
"""

from __future__ import annotations

import re

from flowfix.errors import ConfigError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# [0-9], not \d: only ASCII digits count ('٢h' is not two hours)
_SHORT = re.compile(r"^(?:([0-9]{1,9})d)?(?:([0-9]{1,9})h)?(?:([0-9]{1,9})m)?(?:([0-9]{1,9})s)?$")
_ISO = re.compile(r"^P(?:([0-9]{1,9})D)?(?:T(?:([0-9]{1,9})H)?(?:([0-9]{1,9})M)?(?:([0-9]{1,9}(?:\.[0-9]{1,9})?)S)?)?$")
MAX_SECONDS = 366 * 86400


def parse_window(value: str) -> float:
    """Seconds in ``value``; raises :class:`ConfigError` with one clear line otherwise."""
    raw = value.strip()
    text = raw.lower()
    seconds: float | None = None
    match = _SHORT.match(text)
    if match and any(match.groups()):
        d, h, m, s = (int(g or 0) for g in match.groups())
        seconds = d * 86400 + h * 3600 + m * 60 + s
    else:
        iso = _ISO.match(raw.upper())
        if iso and any(iso.groups()) and not raw.upper().endswith("T"):
            d, h, m = (int(g or 0) for g in iso.groups()[:3])
            seconds = d * 86400 + h * 3600 + m * 60 + float(iso.group(4) or 0)
    if seconds is None:
        shown = value if len(value) <= 40 else value[:40] + "..."
        raise ConfigError(f"--window '{shown}' is not a duration (examples: 90s, 30m, 2h, 1d, PT2H)")
    if seconds <= 0:
        raise ConfigError(f"--window '{value}' must be longer than zero")
    if seconds > MAX_SECONDS:
        raise ConfigError(f"--window '{value}' is longer than a year; that is not a time window any more")
    return seconds
