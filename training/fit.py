"""`python -m training.fit` — placeholder until the trainer lands (issue 5)."""


def main(argv=None):
    print("neuralcpm training.fit: the trainer is not there yet; the package installs and imports.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
