"""Implementation of lab_optax; import the public names from ``lab_optax``."""
