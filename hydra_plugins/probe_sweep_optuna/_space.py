"""The search space: interval and choice overrides as Optuna distributions, sampled values back
as overrides Hydra reads as the same values, and the sampler's seed for each run of a study."""

from __future__ import annotations

import hashlib
import re
from typing import Any

from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override
from hydra.errors import HydraException
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from probe_sweep.tuning import quote_override

PLAIN_VALUE = re.compile(r"[A-Za-z0-9_./+-]+")


def distribution(override: Override) -> BaseDistribution:
    """An Optuna distribution from an interval or choice override; a clear error otherwise."""
    key, value = override.get_key_element(), override.value()
    if isinstance(value, IntervalSweep):
        low, high, log_scale = value.start, value.end, "log" in value.tags
        if low is None or high is None or not low < high:
            raise HydraException(
                f"search space {key}: interval needs low < high, got {low}, {high}"
            )
        if log_scale and low <= 0:
            raise HydraException(f"search space {key}: a log interval needs low > 0, got {low}")
        if "int" in value.tags:
            return IntDistribution(int(low), int(high), log=log_scale)
        return FloatDistribution(float(low), float(high), log=log_scale)
    if isinstance(value, ChoiceSweep):
        return CategoricalDistribution(list(value.list))
    raise HydraException(
        f"search space {key}={override.get_value_element_as_str()} is not an interval or choice; "
        "use e.g. tag(log, interval(1e-6, 1e-1)) or choice(a, b)"
    )


def sampler_seed(seed: int | None, n_existing: int) -> int | None:
    """The TPE seed for a run that finds ``n_existing`` trials in its study: each run of a
    resumed study draws anew (a fixed seed would replay the first run's start-up draws), and
    the same sweep run twice from scratch draws the same."""
    if seed is None:
        return None
    digest = hashlib.sha256(f"{seed}/{n_existing}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def override_value(value: Any) -> str:
    """A sampled parameter as an override value that Hydra reads back as the same value."""
    if isinstance(value, float):
        return repr(value)
    if value is None:
        return "null"
    if isinstance(value, bool | int):
        return str(value).lower() if isinstance(value, bool) else str(value)
    text = str(value)
    return text if _reads_as_itself(text) else quote_override(text)


def _reads_as_itself(text: str) -> bool:
    """Whether ``text`` unquoted is read back as this string (not null, a bool or a number)."""
    if not PLAIN_VALUE.fullmatch(text) or text.lower() in ("null", "true", "false"):
        return False
    try:
        float(text)
    except ValueError:
        return True
    return False
