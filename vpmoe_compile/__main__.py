"""``python -m vpmoe_compile ...`` (see :mod:`vpmoe_compile.cli`)."""

import sys

from vpmoe_compile.cli import main

sys.exit(main())
