"""``python -m globalpool``: the same command line as the ``globalpool`` script.

>>> import subprocess, sys
>>> out = subprocess.run([sys.executable, "-m", "globalpool", "--version"],
...                      capture_output=True, text=True)
>>> out.returncode, out.stdout.split()[0]
(0, 'globalpool')
"""

from globalpool.lab.cli import app

if __name__ == "__main__":
    app(prog_name="globalpool")
