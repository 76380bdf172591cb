"""Classification metrics for the fine-tuning pipeline, as an `evaluate` module backed by scikit-learn.

Loaded by local path (`evaluate.load("tasks/metrics/classification", "single_label")`), so it works
offline. Two configurations:

- `single_label` (default): integer class ids. Accuracy, precision/recall/F1 (macro and weighted),
  Matthews correlation, per-class precision/recall/F1/support, confusion matrix; for two classes and
  given `scores` (probabilities, one row per text) also ROC-AUC and PR-AUC (average precision) of the
  positive class (the second label, id 1).
- `multi_label`: multi-hot 0/1 vectors. F1/precision/recall (micro, macro, weighted), subset accuracy,
  Hamming loss, per-label precision/recall/F1/support and per-label 2x2 counts [tn, fp, fn, tp].
"""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    hamming_loss,
    matthews_corrcoef,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

_DESCRIPTION = "Single-label and multi-label classification metrics (scikit-learn), flat keys plus per-class details."
_CITATION = "Pedregosa et al., Scikit-learn: Machine Learning in Python, JMLR 12, 2011."
_KWARGS_DESCRIPTION = """
Args:
    predictions: single_label: predicted class ids (int). multi_label: predicted multi-hot vectors (0/1).
    references: the true class ids / multi-hot vectors, same shape.
    label_names (list[str], optional): names in id order; default "0", "1", ...
    num_labels (int, optional): number of classes (default: len(label_names) or inferred).
    scores (array n x num_labels, optional, single_label): class probabilities, for binary ROC-AUC/PR-AUC.
Returns:
    a dict of flat float metrics plus "per_class" {name: {precision, recall, f1, support}} and
    "confusion_matrix" {"labels", "matrix"} (multi_label: "kind": "per_label", rows [tn, fp, fn, tp]).
    Undefined values (e.g. ROC-AUC when the test set holds one class) are None.
"""


def _f(x):
    x = float(x)
    return x if np.isfinite(x) else None


def _per_class(y_true, y_pred, names, ids=None):
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=ids, average=None, zero_division=0)
    return {
        n: {"precision": float(a), "recall": float(b), "f1": float(c), "support": int(d)}
        for n, a, b, c, d in zip(names, p, r, f, s, strict=False)
    }


def _averaged(y_true, y_pred, average, ids=None):
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=ids, average=average, zero_division=0)
    return {f"precision_{average}": float(p), f"recall_{average}": float(r), f"f1_{average}": float(f)}


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Classification(evaluate.Metric):
    def _info(self):
        if self.config_name == "multi_label":
            features = datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("int32")),
                    "references": datasets.Sequence(datasets.Value("int32")),
                }
            )
        elif self.config_name in ("single_label", "default"):
            features = datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            )
        else:
            raise ValueError(f"unknown configuration {self.config_name!r}; use 'single_label' or 'multi_label'")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=features,
            reference_urls=["https://scikit-learn.org/stable/modules/model_evaluation.html"],
        )

    def _compute(self, predictions, references, label_names=None, num_labels=None, scores=None):
        y_pred, y_true = np.asarray(predictions), np.asarray(references)
        if self.config_name == "multi_label":
            return self._multi_label(y_true, y_pred, label_names)
        return self._single_label(y_true, y_pred, label_names, num_labels, scores)

    def _single_label(self, y_true, y_pred, names, k, scores):
        if k is None:
            k = len(names) if names else int(max(y_true.max(initial=0), y_pred.max(initial=0)) + 1)
        names = list(names) if names else [str(i) for i in range(k)]
        ids = list(range(k))
        out = {"accuracy": float(accuracy_score(y_true, y_pred))}
        out.update(_averaged(y_true, y_pred, "macro", ids))
        out.update(_averaged(y_true, y_pred, "weighted", ids))
        out["mcc"] = _f(matthews_corrcoef(y_true, y_pred)) if len(y_true) else None
        if k == 2 and scores is not None:
            pos = np.asarray(scores, dtype=np.float64)[:, 1]
            both = len(np.unique(y_true)) == 2
            out["roc_auc"] = _f(roc_auc_score(y_true == 1, pos)) if both else None
            out["pr_auc"] = _f(average_precision_score(y_true == 1, pos)) if both else None
        out["per_class"] = _per_class(y_true, y_pred, names, ids)
        out["confusion_matrix"] = {"labels": names, "matrix": confusion_matrix(y_true, y_pred, labels=ids).tolist()}
        return out

    def _multi_label(self, y_true, y_pred, names):
        y_true = y_true.reshape(len(y_true), -1).astype(int)
        y_pred = y_pred.reshape(len(y_pred), -1).astype(int)
        names = list(names) if names else [str(i) for i in range(y_true.shape[1])]
        out = {}
        for avg in ("micro", "macro", "weighted"):
            out.update(_averaged(y_true, y_pred, avg))
        out["subset_accuracy"] = float(accuracy_score(y_true, y_pred))
        out["hamming_loss"] = float(hamming_loss(y_true, y_pred))
        out["per_class"] = _per_class(y_true, y_pred, names)
        mcm = multilabel_confusion_matrix(y_true, y_pred)  # per label [[tn, fp], [fn, tp]]
        out["confusion_matrix"] = {
            "labels": names,
            "kind": "per_label",
            "columns": ["tn", "fp", "fn", "tp"],
            "matrix": [m.ravel().tolist() for m in mcm],
        }
        return out
