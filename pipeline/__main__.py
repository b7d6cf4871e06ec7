"""``python -m pipeline`` (or the ``open-rstar`` console script): everything besides running rounds."""

from pipeline.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
