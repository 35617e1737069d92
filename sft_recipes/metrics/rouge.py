"""ROUGE-L F-measure (longest common subsequence of words), averaged over examples.

Uses rouge-score's default tokenizer: lowercase, every run of characters other than a-z/0-9 is a
separator, so punctuation is ignored and text without Latin letters or digits scores 0. No stemming.
Output: {"rouge_l": mean F in [0, 1]}; with `per_example=True` also {"rouge_l_scores": [...]}.
"""
import datasets
import evaluate
from rouge_score import rouge_scorer

_CITATION = "Lin, Chin-Yew. ROUGE: A Package for Automatic Evaluation of Summaries. ACL workshop, 2004."


class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__, citation=_CITATION,
            inputs_description="predictions: list of str; references: list of str (one per prediction)",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}))

    def _compute(self, predictions, references, per_example=False):
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
        out = {"rouge_l": sum(scores) / len(scores) if scores else 0.0}
        return {**out, "rouge_l_scores": scores} if per_example else out
