"""``python -m aotpack.bench worker|load ARGS_JSON``: the process ``measure.spawn`` starts for one measurement."""

import sys

from aotpack.bench.measure import main

if __name__ == "__main__":
    main(sys.argv[1:])
