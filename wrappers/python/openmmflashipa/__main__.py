"""``python -m openmmflashipa`` runs the ``flashipa`` command line (openmmflashipa/cli.py)."""
import sys

from .cli import main

sys.exit(main())
