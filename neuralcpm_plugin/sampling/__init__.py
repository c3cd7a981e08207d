"""Samplers: the exact sequential Metropolis sampler (exact), its multi-core checkerboard form (checkerboard)
and the paper's parallel sampler (parallel)."""

from .checkerboard import *
from .exact import *
from .parallel import *
