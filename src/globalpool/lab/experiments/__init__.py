"""``globalpool compare``: train one backbone per head and seed, and measure which head wins.

>>> from globalpool.lab.experiments import mean_ci
>>> round(mean_ci([1.0, 2.0, 3.0])[0], 1)
2.0
"""

from globalpool.lab.experiments.results import ResultStore
from globalpool.lab.experiments.runner import train_and_evaluate
from globalpool.lab.experiments.saved import find_runs, load_run
from globalpool.lab.experiments.spec import DEFAULTS, RunSpec, TrainConfig
from globalpool.lab.experiments.stats import mean_ci

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
