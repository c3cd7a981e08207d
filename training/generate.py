"""`python -m training.generate {cellsort,mnist,bipolar,tissue} ...` — make the paper's datasets.

Each data set lives in its own module (``training.gen_<name>``) exposing ``add_arguments(parser)`` and
``run(args) -> int``.
"""

from neuralcpm_plugin.cli import command

from ._dispatch import dispatch

DATASETS = {"cellsort": "Cell sorting (paper §4.2)", "mnist": "Cellular MNIST (paper §4.3)",
            "bipolar": "Bipolar organisation (paper §4.4)",
            "tissue": "Tissue scale: 1000x1000, 10,000 cells (speed and scale test)"}


@command
def main(argv=None) -> int:
    return dispatch("python -m training.generate", "Generate the paper's datasets.", DATASETS, "gen_", argv)


if __name__ == "__main__":
    raise SystemExit(main())
