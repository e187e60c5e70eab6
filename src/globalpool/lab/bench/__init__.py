"""``globalpool bench``: timing of every way of global pooling against same-run ceilings.

Modules: ``shapes`` (cases), ``methods`` (what is timed), ``check`` (reference check before
timing), ``timing`` (median and min–max of repeats), ``cache`` (cold or warm caches before each
sample), ``runner`` (one case end to end), ``targets`` (the speed targets), ``markdown`` and
``plot`` (the report's tables and bars), ``report`` (writes JSON, Markdown, PNG), ``memory``
(bytes saved for backward), ``command`` (the CLI functions).

>>> from globalpool.lab.bench import bench, bench_memory
>>> callable(bench) and callable(bench_memory)
True
"""

from globalpool.lab.bench.command import bench, bench_memory

__all__ = ["bench", "bench_memory"]
