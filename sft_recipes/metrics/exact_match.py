"""Exact match after normalisation, as a fraction of examples in [0, 1].

Normalisation (SQuAD-style), applied to prediction and reference alike: lowercase; remove ASCII
punctuation; remove the English articles "a", "an", "the" as whole words; collapse whitespace
runs to one space and strip the ends. So "The Paris!" matches "paris", "cold " matches "Cold".
Output: {"exact_match": fraction}; with `per_example=True` also {"exact_match_scores": [0/1...]}.
"""
import re
import string

import datasets
import evaluate

_PUNCT = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__, citation="",
            inputs_description="predictions: list of str; references: list of str (one per prediction)",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}))

    def _compute(self, predictions, references, per_example=False):
        scores = [float(normalize(p) == normalize(r)) for p, r in zip(predictions, references)]
        out = {"exact_match": sum(scores) / len(scores) if scores else 0.0}
        return {**out, "exact_match_scores": scores} if per_example else out
