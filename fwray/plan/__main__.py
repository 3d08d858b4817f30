"""`python -m fwray.plan EXP.yaml --hours H ...`."""
import sys

from .planner import main

if __name__ == "__main__":
    sys.exit(main())
