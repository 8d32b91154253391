"""``python -m nbbn``: the nbbn command."""
import sys

from .cli import main

sys.exit(main())
