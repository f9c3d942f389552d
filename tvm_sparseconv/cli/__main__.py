"""``python -m tvm_sparseconv.cli``: the ``tvm-sparseconv`` command."""
import sys

from . import main

sys.exit(main())
