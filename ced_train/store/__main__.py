"""`python -m ced_train.store info|verify ...`: see `ced_train.store.checks`."""

import sys

from ced_train.store.checks import main

sys.exit(main())
