"""Corpus BLEU from sacrebleu (one reference per prediction), on sacrebleu's 0-100 scale.

n-gram counts are summed over the whole corpus before the precisions are taken, so this is not a
mean of sentence scores. sacrebleu defaults: 13a tokenizer, case-sensitive, `exp` smoothing (an
order with no match counts as 1/(2^k * total) for the k-th such order). Output: {"bleu": score};
with `per_example=True` also {"bleu_scores": [...]} (sentence BLEU, for ranking examples).
"""
import datasets
import evaluate
import sacrebleu

_CITATION = ("Papineni et al. BLEU: a Method for Automatic Evaluation of Machine Translation. ACL 2002. "
             "Post. A Call for Clarity in Reporting BLEU Scores. WMT 2018.")


class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__, citation=_CITATION,
            inputs_description="predictions: list of str; references: list of str (one per prediction)",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}))

    def _compute(self, predictions, references, per_example=False):
        out = {"bleu": sacrebleu.corpus_bleu(predictions, [references]).score if predictions else 0.0}
        if per_example:
            out["bleu_scores"] = [sacrebleu.sentence_bleu(p, [r]).score for p, r in zip(predictions, references)]
        return out
