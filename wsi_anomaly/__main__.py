"""``python -m wsi_anomaly``: the ``wsi-anomaly`` command."""

import sys

from .cli import main

sys.exit(main())
