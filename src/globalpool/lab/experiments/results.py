"""Resumable JSON store: one file per finished run, written atomically, never deleted.

Layout under ``root``::

    runs/<dataset>/<model>-<fingerprint>/<head>-seed<S>-n<train_size|full>.json
    runs/<dataset>/<model>-<fingerprint>/<head>-seed<S>-n<train_size|full>.pt    (weights)

``<fingerprint>`` hashes the model name, the training settings and how the run is made
(:class:`~globalpool.lab.experiments.provenance.RunEnv`: torch threads, processes, device, torch and
globalpool versions, dataset digest), so changing ``--epochs``, ``--threads`` or the torch
version starts a fresh set of runs beside the old ones instead of mixing or overwriting them.
A run whose file exists (and parses) is finished and is skipped on re-run. With
``save_models`` (the default) the trained weights (``state_dict``, ``torch.save``) are written
beside the record, before it, so a record that names a ``model_file`` always has it;
:func:`globalpool.lab.experiments.saved.load_run` rebuilds the model. Files get the mode
``0o666`` less the umask, as any plainly created file would.

>>> import tempfile
>>> from globalpool.lab.experiments.spec import RunSpec, TrainConfig
>>> store = ResultStore(tempfile.mkdtemp())
>>> spec = RunSpec("mnist1d", "cnn1d", "avg", 0, None, TrainConfig(1, 100, 0.01))
>>> store.load(spec) is None
True
>>> _ = store.save(spec, {"accuracy": 0.9})
>>> store.load(spec)["accuracy"]
0.9
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from globalpool.lab.experiments.spec import RunSpec


class OutputError(OSError):
    """The output directory cannot be created or written; the message is one line."""


def dataset_slug(dataset: str) -> str:
    """A directory-safe name: ``folder:/data/pets`` -> ``folder-pets-<hash>``.

    >>> dataset_slug("mnist1d"), dataset_slug("folder:/data/pets")[:12]
    ('mnist1d', 'folder-pets-')
    """
    name, sep, rest = dataset.partition(":")
    if not sep:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(rest.rstrip("/\\")).name or "root")
    digest = hashlib.sha256(rest.encode()).hexdigest()[:8]
    return f"{name}-{base}-{digest}"


def current_umask() -> int:
    """This process's umask, read without changing it where the OS allows (Linux ``/proc``).

    >>> 0 <= current_umask() <= 0o777
    True
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but brief)
    os.umask(mask)
    return mask


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``.

    A crash leaves either the old file or the new one, never a truncated one. The file gets the
    mode a plain ``open(path, "w")`` would give (``0o666`` less the umask), not ``mkstemp``'s
    private ``0o600``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(root: str | os.PathLike[str]) -> Path:
    """Create ``root`` if needed and prove a file can be written there; else :class:`OutputError`.

    >>> import tempfile
    >>> check_writable(tempfile.mkdtemp()).is_dir()
    True
    """
    path = Path(root).expanduser()
    try:
        if path.exists() and not path.is_dir():
            raise OutputError(f"--out {path} exists and is not a directory")
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OutputError:
        raise
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise OutputError(f"--out {path} is not writable ({reason})") from err
    return path


class ResultStore:
    """Finished runs under ``root``; see the module docstring for the layout."""

    def __init__(self, root: str | os.PathLike[str], *, save_models: bool = True) -> None:
        self.root = Path(root).expanduser()
        self.save_models = save_models

    def path(self, spec: RunSpec) -> Path:
        size = "full" if spec.train_size is None else str(spec.train_size)
        return (
            self.root
            / "runs"
            / dataset_slug(spec.dataset)
            / f"{spec.model}-{spec.fingerprint}"
            / f"{spec.head}-seed{spec.seed}-n{size}.json"
        )

    def load(self, spec: RunSpec) -> dict[str, Any] | None:
        """The stored record of ``spec``, or ``None`` if absent or unreadable (then re-run)."""
        try:
            record = json.loads(self.path(spec).read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) and "accuracy" in record else None

    def model_path(self, spec: RunSpec) -> Path:
        """Where the trained weights of ``spec`` go: the record's path with ``.pt``."""
        return self.path(spec).with_suffix(".pt")

    def save(self, spec: RunSpec, record: dict[str, Any], model: Any = None) -> Path:
        """Write ``record`` for ``spec`` atomically and return its path; with a ``model``
        (and ``save_models``) its ``state_dict`` goes first to :meth:`model_path`, and the record
        names it as ``model_file``."""
        path = self.path(spec)
        if model is not None and self.save_models:
            import io

            import torch

            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            buffer = io.BytesIO()
            torch.save(state, buffer)
            atomic_write(self.model_path(spec), buffer.getvalue())
            record = {**record, "model_file": self.model_path(spec).name}
        atomic_write(path, json.dumps(record, indent=2, sort_keys=True) + "\n")
        return path

    def discard_partial(self, spec: RunSpec) -> None:
        """Remove temporary files a writer of ``spec`` killed mid-:func:`atomic_write` left."""
        path = self.path(spec)
        for name in (path.name, self.model_path(spec).name):
            for tmp in path.parent.glob(f".{name}.*.tmp"):
                tmp.unlink(missing_ok=True)
