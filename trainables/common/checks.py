"""Cross-field rules of a family's config, checked by the compiler before anything starts.

A family module may define ``check(config: dict) -> None`` that raises :class:`ConfigError` for a
config its ``train`` would refuse. The compiler (``orchestrator.spaces``) calls it on every trial
config a study launches, each grid point x seed, so a bad combination is one line and exit 2
instead of an errored trial per seed. A plain function over the dict, rather than a dataclass or
a pydantic model: types and ranges are already checked against the YAML defaults and ``params``,
what is left is a few relations between fields, and the family contract stays ``dict`` in,
``report`` out, with no new dependency.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config that ``train`` cannot run; the message names the fields and their values."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)
