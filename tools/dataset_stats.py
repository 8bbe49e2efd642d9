#!/usr/bin/env python
"""Object-size and instances-per-image statistics of a registered dataset, with suggested
SOLOv2 settings: see solov2_d2.data.stats.

    python tools/dataset_stats.py --dataset fruit_train [--config-file FILE] [--json]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import solov2_d2  # noqa: E402,F401  # isort: split

from solov2_d2.data.stats import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
