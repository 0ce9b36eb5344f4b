"""``python -m wsi_anomaly.cli``: the ``wsi-anomaly`` command."""

import sys

from . import main

sys.exit(main())
