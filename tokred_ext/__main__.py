"""``python -m tokred_ext``: the ``tokred`` command."""
import sys

from .cli import main

sys.exit(main())
