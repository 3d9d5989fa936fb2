"""``python -m trainkit ...`` is the same as ``trainkit ...``."""

from trainkit.cli import main

if __name__ == "__main__":
    main()
