"""``python -m cprfsm`` runs the command line."""

import sys

from cprfsm.cli import main

sys.exit(main())
