"""``python -m onnxprune.cli``: the command line, as the ``onnxprune`` script runs it."""

import sys

from onnxprune.cli import main

sys.exit(main())
