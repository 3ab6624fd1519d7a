"""chain_gen's scoring: eval.py's exact match, so the harness and eval.py score a generation the same way."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for eval.py
from eval import extract_answer, normalize  # noqa: E402


def process_results(doc: dict, results: list) -> dict:
    """results: [the generated text, cut at the first stop sequence] -> {"exact_match": 1.0 or 0.0}."""
    return {"exact_match": float(extract_answer(results[0]) == normalize(doc["answer"]))}
