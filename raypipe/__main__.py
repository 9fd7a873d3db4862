"""``python -m raypipe`` = the ``raypipe`` command."""
import sys

from .cli import main

sys.exit(main())
