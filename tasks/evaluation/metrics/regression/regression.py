"""Regression metrics for the fine-tuning pipeline, as an `evaluate` module backed by scikit-learn and scipy.

Loaded by local path (`evaluate.load("tasks/metrics/regression")`), so it works offline.
Returns mse, rmse, mae, r2, pearson and spearman (None where undefined, e.g. a constant prediction).
"""

import datasets
import evaluate
import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

_DESCRIPTION = "Regression metrics (scikit-learn, scipy): mse, rmse, mae, r2, pearson, spearman."
_CITATION = (
    "Pedregosa et al., Scikit-learn: Machine Learning in Python, JMLR 12, 2011; Virtanen et al., SciPy 1.0, 2020."
)
_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted values (float).
    references: true values (float).
Returns:
    {"mse", "rmse", "mae", "r2", "pearson", "spearman"}: floats, None where undefined.
"""


def _f(x):
    x = float(x)
    return x if np.isfinite(x) else None


def _corr(fn, a, b):
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None  # undefined for constant input
    return _f(fn(a, b)[0])


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Regression(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}
            ),
            reference_urls=["https://scikit-learn.org/stable/modules/model_evaluation.html#regression-metrics"],
        )

    def _compute(self, predictions, references):
        y_pred = np.asarray(predictions, dtype=np.float64)
        y_true = np.asarray(references, dtype=np.float64)
        mse = float(mean_squared_error(y_true, y_pred))
        return {
            "mse": mse,
            "rmse": float(np.sqrt(mse)),
            "mae": float(mean_absolute_error(y_true, y_pred)),
            "r2": _f(r2_score(y_true, y_pred)) if len(y_true) > 1 else None,
            "pearson": _corr(pearsonr, y_pred, y_true),
            "spearman": _corr(spearmanr, y_pred, y_true),
        }
