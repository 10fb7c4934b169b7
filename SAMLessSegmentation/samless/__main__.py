"""`python -m samless ...` (how the Slicer module starts the background process)."""

import sys

from samless.cli import main

sys.exit(main())
