"""``python -m anyhsm.signer``: the same program as the ``anyhsm-signer`` console script."""

import sys

from anyhsm.signer.main import main

sys.exit(main())
