"""``python -m globalpool``: the same command line as the ``globalpool`` script
(:mod:`globalpool._entry`).

>>> import subprocess, sys
>>> out = subprocess.run([sys.executable, "-m", "globalpool", "--version"],
...                      capture_output=True, text=True)
>>> out.returncode, out.stdout.split()[0]
(0, 'globalpool')
"""

from globalpool._entry import main

if __name__ == "__main__":
    main()
