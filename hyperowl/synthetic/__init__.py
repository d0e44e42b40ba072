"""Seeded synthetic vision tasks (shapes, digits, scenes, picture sets, videos) for training and evaluation."""

from hyperowl.synthetic.accuracy import HELD_OUT_SEED, evaluate_tasks
from hyperowl.synthetic.tasks import TASKS, Sample, TaskMixture, TaskOptions, make_sample
from hyperowl.synthetic.write import write_dataset

__all__ = ["HELD_OUT_SEED", "TASKS", "Sample", "TaskMixture", "TaskOptions", "evaluate_tasks", "make_sample", "write_dataset"]
