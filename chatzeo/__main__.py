"""``python -m chatzeo`` runs the ``chatzeo`` command."""

import sys

from .cli import main

sys.exit(main())
