"""`python -m hfprune` runs the same click group as the `hfprune` console script."""

from hfprune.cli import main


if __name__ == "__main__":
    main()
