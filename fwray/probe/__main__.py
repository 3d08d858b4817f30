"""`python -m fwray.probe EXP.yaml [section.key=value ...]`."""
import sys

from .sweep import main

if __name__ == "__main__":
    sys.exit(main())
