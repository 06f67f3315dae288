"""Shared pytest configuration.

Hypothesis draws new examples on every run by default. CI sets
``HYPOTHESIS_PROFILE=ci``, which derandomizes the search so that a run on a clean
clone is reproducible; locally the default profile keeps exploring.
"""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
