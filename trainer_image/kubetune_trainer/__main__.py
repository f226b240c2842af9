"""`python -m kubetune_trainer --config trainer.json [--mode validate|train]`."""

import sys

from kubetune_trainer.main import main

if __name__ == "__main__":
    sys.exit(main())
