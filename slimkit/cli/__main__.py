"""`python -m slimkit.cli ...`: the command line (used for fresh benchmark processes and torchrun)."""

import sys

from slimkit.cli import main

sys.exit(main())
