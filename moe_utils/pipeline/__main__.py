"""``python -m moe_utils.pipeline``: run the study's stages and build the book (:func:`.runner.main`)."""

import sys

from moe_utils.pipeline.runner import main

sys.exit(main())
