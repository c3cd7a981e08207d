"""Import every module that defines built-in term kinds, so that they register themselves.

Add a module here when a new term module is written.
"""

from . import analytic, closure, local_nh, neural, pooled_nh  # noqa: F401
