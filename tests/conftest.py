"""Shared pytest configuration.

Hypothesis draws new examples on every run by default. CI sets
``HYPOTHESIS_PROFILE=ci``, which derandomizes the search so that a run on a clean
clone is reproducible; locally the default profile keeps exploring. Neither has a
deadline.
"""

import os

from hypothesis import settings

# No deadline: the first example of a test compiles JAX code, and a loaded machine
# can take longer than hypothesis's 200 ms for any example.
settings.register_profile("ci", derandomize=True, print_blob=True, deadline=None)
settings.register_profile("default", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
