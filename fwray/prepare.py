"""`python -m fwray.prepare EXP.yaml [section.key=value ...]`: tokenize an experiment's parquet into the token cache."""
import sys

# the stage's module under its own name, not __main__: Ray's workers unpickle its functions by module path
from .data.prepare import main

if __name__ == "__main__":
    sys.exit(main())
