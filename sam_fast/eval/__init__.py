"""Evaluation: the SAM scorer's caption metrics and the generation/evaluation runner."""

from sam_fast.eval.metrics import caption_metrics, normalize_text, round_metrics
from sam_fast.eval.runner import answer, evaluate, predict

__all__ = ["caption_metrics", "normalize_text", "round_metrics", "answer", "evaluate", "predict"]
