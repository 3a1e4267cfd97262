"""`python -m edgeseg ...`: the same as the `edgeseg` command."""
import sys

from edgeseg.cli import main

sys.exit(main())
