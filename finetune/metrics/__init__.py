"""GLGE-style evaluation metrics (methods.md §4.2, §7.9).

Entry points: evaluate_task(task, hypotheses, references) -> {metric: value, ..., "task_score": value} and
glge_score({task: task_score or evaluate_task result}). The per-metric functions live in scores.py (METEOR 1.5,
a Java jar, in meteor.py), the text preparation in text.py, the task registry in finetune/glge_tasks.py.
"""

from finetune.metrics.evaluate import TaskEvaluation, evaluate_task, evaluate_task_detailed, glge_score, task_score

__all__ = ["TaskEvaluation", "evaluate_task", "evaluate_task_detailed", "glge_score", "task_score"]
