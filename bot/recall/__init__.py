"""Recall of older turns: terms for the index, fusion of rankings, vectors, fitting."""

from bot.recall.fitting import RECALL_HEADER, Recalled, RecallMessage, fit_recalled
from bot.recall.fusion import reciprocal_rank_fusion
from bot.recall.terms import index_terms, query_terms
from bot.recall.vectors import VectorCache

__all__ = [
    "RECALL_HEADER",
    "RecallMessage",
    "Recalled",
    "VectorCache",
    "fit_recalled",
    "index_terms",
    "query_terms",
    "reciprocal_rank_fusion",
]
