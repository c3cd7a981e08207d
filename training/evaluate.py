"""`python -m training.evaluate {params,check,table1,table2} ...` — evaluate trained runs.

Each evaluation lives in its own module (``training.eval_<name>``) exposing ``add_arguments(parser)`` and
``run(args) -> int``.
"""

from neuralcpm_plugin.cli import command

from ._dispatch import dispatch

EVALUATIONS = {"params": "Parameter RMSE at T=1 and T* (paper §4.2), intervals",
               "check": "Posterior predictive check: roll the model out from the data's starts, compare statistics",
               "table1": "Cellular MNIST roll-out metrics (paper Table 1)",
               "table2": "Bipolar roll-out metrics (paper Table 2)"}


@command
def main(argv=None) -> int:
    return dispatch("python -m training.evaluate", "Evaluate trained runs.", EVALUATIONS, "eval_", argv)


if __name__ == "__main__":
    raise SystemExit(main())
