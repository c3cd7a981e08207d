"""Samplers: the exact sequential Metropolis sampler (exact) and the paper's parallel sampler (parallel)."""

from .exact import *
from .parallel import *

