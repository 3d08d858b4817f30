"""`python -m fwray.tracking replay FILE.jsonl | metrics`."""
import sys

from .store import main

if __name__ == "__main__":
    sys.exit(main())
