"""Shared pytest configuration.

Hypothesis draws new examples on every run by default. CI sets
``HYPOTHESIS_PROFILE=ci``, which derandomizes the search so that a run on a clean
clone is reproducible; locally the default profile keeps exploring. Neither has a
deadline.

The tests compile many small programs and run most of them a few times, so
XLA's backend (LLVM) optimizations cost more than they save: the suite runs
with ``JAX_DISABLE_MOST_OPTIMIZATIONS=1`` (about a third less time on 2 CPU
cores; the HLO passes, fusion and buffer assignment included, still run, so
the tests that read compiled HLO and its memory see what users get). Set the
variable to 0 to test with the optimized backend. The notebooks' kernels
inherit it.
"""

import os

os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402  (after the variable, which jax reads at import)
from hypothesis import settings  # noqa: E402

jax.config.update(
  "jax_disable_most_optimizations",
  os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"].lower() not in ("", "0", "false", "no", "off"),
)

# No deadline: the first example of a test compiles JAX code, and a loaded machine
# can take longer than hypothesis's 200 ms for any example.
settings.register_profile("ci", derandomize=True, print_blob=True, deadline=None)
settings.register_profile("default", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
