"""``python -m kava ...`` = the ``kava`` command (also ``accelerate launch -m kava train ...``)."""

import sys

from kava.cli import main

if __name__ == "__main__":
    sys.exit(main())
