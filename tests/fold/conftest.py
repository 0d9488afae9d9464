"""Hypothesis profiles: "ci" (the default) is derandomized, so every run draws the same examples.

HYPOTHESIS_PROFILE=dev explores fresh examples on each run.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", derandomize=True, max_examples=50, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
