"""``python -m rsrefseg`` runs the command-line interface."""

import sys

from rsrefseg.cli.main import main

sys.exit(main())
