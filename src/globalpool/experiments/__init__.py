"""``globalpool compare``: train one backbone per head and seed, and measure which head wins.

>>> from globalpool.experiments import mean_ci
>>> round(mean_ci([1.0, 2.0, 3.0])[0], 1)
2.0
"""

from globalpool.experiments.results import ResultStore
from globalpool.experiments.runner import train_and_evaluate
from globalpool.experiments.saved import find_runs, load_run
from globalpool.experiments.spec import DEFAULTS, RunSpec, TrainConfig
from globalpool.experiments.stats import mean_ci

__all__ = [
    "DEFAULTS",
    "ResultStore",
    "RunSpec",
    "TrainConfig",
    "find_runs",
    "load_run",
    "mean_ci",
    "train_and_evaluate",
]
