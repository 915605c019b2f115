"""Test session setup: CPU only, quiet logs."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# XLA's optimisation passes dominate the compile time of the small programs the tests
# build (about 2.5x on the tiny train step) and buy nothing at these shapes; the
# variable reaches every subprocess the tests start, too.
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
