"""Generation metrics for instruction tuning, as an `evaluate` module: exact match after normalisation and ROUGE-L
(the `rouge-score` package, Google's reimplementation of ROUGE-1.5.5).

Loaded by local path (`evaluate.load("tasks/evaluation/metrics/generation")`), so it works offline.
Normalisation for exact match: Unicode NFKC, lowercase, whitespace collapsed, surrounding spaces and a trailing
full stop removed ("The answer is 4." == "the answer is 4").
"""

import re
import unicodedata

import datasets
import evaluate
from rouge_score import rouge_scorer

_DESCRIPTION = "Exact match (normalised) and ROUGE-L F-measure of generated answers against the references."
_CITATION = "Lin, ROUGE: A Package for Automatic Evaluation of Summaries, ACL Workshop 2004."
_KWARGS_DESCRIPTION = """
Args:
    predictions: generated answers (str).
    references: reference answers (str).
Returns:
    {"exact_match": share of exact matches after normalisation, "rouge_l": mean ROUGE-L F-measure,
     "per_example": [{"exact_match": 0|1, "rouge_l": float}, ...]}
"""


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"\s+", " ", text).strip()
    return text[:-1].rstrip() if text.endswith(".") else text


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Generation(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            reference_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
        )

    def _compute(self, predictions, references):
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        rows = []
        for pred, ref in zip(predictions, references, strict=True):
            rows.append(
                {
                    "exact_match": int(normalize(pred) == normalize(ref)),
                    "rouge_l": float(scorer.score(ref, pred)["rougeL"].fmeasure),
                }
            )
        n = max(1, len(rows))
        return {
            "exact_match": sum(r["exact_match"] for r in rows) / n,
            "rouge_l": sum(r["rouge_l"] for r in rows) / n,
            "per_example": rows,
        }
