"""`python -m jobs.tiny OUT_DIR`: the tiny offline models."""

import sys

from jobs.tiny import main

sys.exit(main(prog="python -m jobs.tiny"))
