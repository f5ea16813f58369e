"""``python -m adaprec.tune --policy cpt --task digits --trials 30 ...`` (same as ``adaprec tune``)."""

import sys

from .cli import main

sys.exit(main())
