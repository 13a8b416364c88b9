"""Hypothesis profiles for the fuzz suite, chosen by MAILPIPE_FUZZ_PROFILE.

`fuzz` (the default) keeps each test to a few seconds inside `make test`; `make fuzz` selects
`fuzz-long`, which runs many more examples. The fuzz tests take their settings from
`fuzz.strategies.fuzz_settings()`, so the profile never changes the rest of the suite.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

settings.register_profile("fuzz", max_examples=100, deadline=None, suppress_health_check=_QUIET)
settings.register_profile(
    "fuzz-long", max_examples=5_000, deadline=None, suppress_health_check=_QUIET
)
