"""The COCO 1K protocol written out (MODEL.md §4), the reference the tests compare the library's 5-fold results with."""
from __future__ import annotations

import numpy as np

from hsc_pyg.engine.metrics import average_metrics, fold_slices, recall_metrics


def fold5_metrics(sims, per_image: int = 5, fold_size: int = 1000) -> dict:
    """Each diagonal block's metrics (``fold_size`` images x their captions), averaged over the folds."""
    return average_metrics([recall_metrics(np.asarray(sims)[rows, cols], per_image)
                            for rows, cols in fold_slices(len(sims), per_image, fold_size)])
