"""BLEU, chrF (sacrebleu) and ROUGE (rouge-score) as `evaluate` modules that work offline.

    load_metric("bleu").compute(predictions=[...], references=[[...], ...])

Each returns the corpus score(s) plus `per_example` scores; `hf:<name>` loads any metric from
the evaluate hub where a network exists.
"""

from __future__ import annotations

from typing import Any

import datasets
import evaluate
import numpy as np
import sacrebleu
from rouge_score import rouge_scorer, scoring

from llmgen.errors import LlmgenError
from llmgen.config import suggest
from llmgen.hub import require_hub

_FEATURES = [
    datasets.Features({"predictions": datasets.Value("string"),
                       "references": datasets.Sequence(datasets.Value("string"))}),
    datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
]


def _ref_lists(references: list) -> list[list[str]]:
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    if any(not r for r in refs):
        raise LlmgenError("every example needs at least one reference")
    return refs


def _streams(refs: list[list[str]]) -> list[list[str]]:
    """sacrebleu wants one stream per reference slot; examples with fewer references repeat their
    first one (a duplicate reference changes neither clipped counts nor the closest length)."""
    n = max(map(len, refs))
    return [[r[i] if i < len(r) else r[0] for r in refs] for i in range(n)]


class Bleu(evaluate.Metric):
    """Corpus BLEU with sacrebleu's defaults (13a tokenizer, exp smoothing); per-example sentence BLEU."""

    def _info(self):
        return evaluate.MetricInfo(description="sacrebleu corpus BLEU", citation="Post, 2018", features=_FEATURES,
                                   module_name="llmgen_bleu")

    def _compute(self, predictions, references) -> dict[str, Any]:

        refs = _ref_lists(references)
        bleu = sacrebleu.BLEU()
        score = bleu.corpus_score(list(predictions), _streams(refs))
        sent = sacrebleu.BLEU(effective_order=True)
        per = [sent.sentence_score(p, r).score for p, r in zip(predictions, refs)]
        return {"bleu": score.score, "precisions": score.precisions, "brevity_penalty": score.bp,
                "signature": str(bleu.get_signature()), "per_example": per}


class Chrf(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description="sacrebleu chrF", citation="Popović, 2015", features=_FEATURES,
                                   module_name="llmgen_chrf")

    def _compute(self, predictions, references) -> dict[str, Any]:

        refs = _ref_lists(references)
        chrf = sacrebleu.CHRF()
        score = chrf.corpus_score(list(predictions), _streams(refs))
        per = [chrf.sentence_score(p, r).score for p, r in zip(predictions, refs)]
        return {"chrf": score.score, "signature": str(chrf.get_signature()), "per_example": per}


class Rouge(evaluate.Metric):
    """ROUGE-1/2/L/Lsum F-measure with the Porter stemmer (rouge-score); several references: the best one.
    Aggregation `mean` (default) or `bootstrap` (rouge-score's BootstrapAggregator, mid estimate, seeded)."""

    TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

    def _info(self):
        return evaluate.MetricInfo(description="rouge-score ROUGE", citation="Lin, 2004", features=_FEATURES,
                                   module_name="llmgen_rouge")

    def _compute(self, predictions, references, aggregation: str = "mean", seed: int = 1337) -> dict[str, Any]:

        refs = _ref_lists(references)
        scorer = rouge_scorer.RougeScorer(list(self.TYPES), use_stemmer=True)
        scores = [scorer.score_multi(r, p) for p, r in zip(predictions, refs)]
        per = [{k: s[k].fmeasure for k in self.TYPES} for s in scores]
        if aggregation == "bootstrap":
            state = np.random.get_state()
            np.random.seed(seed)
            agg = scoring.BootstrapAggregator()
            for s in scores:
                agg.add_scores(s)
            result = {k: v.mid.fmeasure for k, v in agg.aggregate().items()}
            np.random.set_state(state)
        elif aggregation == "mean":
            result = {k: float(np.mean([p[k] for p in per])) if per else 0.0 for k in self.TYPES}
        else:
            raise LlmgenError(f"ROUGE aggregation {aggregation!r} is unknown; use mean or bootstrap")
        return {**result, "per_example": per}


LOCAL = {"bleu": Bleu, "chrf": Chrf, "rouge": Rouge}
ALL_METRICS = ("ppl", *LOCAL)


def load_metric(name: str) -> evaluate.Metric:
    if name in LOCAL:
        return LOCAL[name]()
    if name.startswith("hf:"):
        require_hub(name)
        return evaluate.load(name[3:])
    raise LlmgenError(f"unknown metric {name!r}{suggest(name, ALL_METRICS)}; available: {', '.join(ALL_METRICS)}, "
                      f"or hf:<name> for an evaluate hub metric")
