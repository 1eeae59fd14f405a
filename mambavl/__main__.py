"""``python -m mambavl`` (and ``torchrun -m mambavl``): the command line."""

from mambavl.cli import main

if __name__ == "__main__":
    main()
