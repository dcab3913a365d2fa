"""`python -m ced_train.store info|verify|import-official ...`: see `ced_train.store.checks`."""

import sys

from ced_train.extras import MissingExtra
from ced_train.store.checks import main

try:
    sys.exit(main())
except MissingExtra as error:  # import-official without the `official` extra: one line, exit 2 as in the other CLIs
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
