"""Metrics: summary statistics of states (stats), the paper's metrics (paper), parameter errors (params)."""

from .paper import *
from .params import *
from .stats import *

