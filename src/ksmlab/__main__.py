"""``python -m ksmlab`` runs the command line."""

import sys

from ksmlab.cli import main

sys.exit(main())
