"""Evaluation of trained models: long-context recall per (length, depth), single process or with CP.

* :mod:`dist_attn.eval.tasks` -- recall prompts: ``passkey`` (text needle in filler from the
  validation stream, or synthetic text) and ``mqar`` (the MQAR training format at any length).
* :mod:`dist_attn.eval.recall` -- the evaluation loop (:func:`evaluate_recall` for a single-process
  ``logits_fn``, :func:`evaluate_recall_cp` on the ranks of a CP group), the result JSON.
* :mod:`dist_attn.eval.plot` -- the heat map PNG (length x depth; optional matplotlib).
"""
from dist_attn.eval.recall import (SCHEMA, RecallResult, cp_answer_fn, default_lengths, evaluate_recall,
                                   evaluate_recall_cp, format_table, run_recall, write_results)
from dist_attn.eval.tasks import TASKS, MQARProbe, PasskeyTask, RecallPrompt, make_task

__all__ = ["SCHEMA", "RecallResult", "cp_answer_fn", "default_lengths", "evaluate_recall", "evaluate_recall_cp",
           "format_table", "run_recall", "write_results", "TASKS", "MQARProbe", "PasskeyTask", "RecallPrompt",
           "make_task"]
