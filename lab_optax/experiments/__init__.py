"""The paper's experiments: data loaders, models, training loops and the ``lab-optax`` command line.

Needs the optional ``experiments`` extra (scikit-learn, matplotlib, tqdm); the
library itself (``lab_optax``) does not import this package.
"""
