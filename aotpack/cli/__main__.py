"""``python -m aotpack.cli``: the same command as the ``aotpack`` script."""

from aotpack.cli import main

if __name__ == "__main__":
    main()
