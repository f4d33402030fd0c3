"""``python -m virnuc_dask``: the ``virnuc-dask`` command, for environments without its script.

The program's name is given, so usage lines and messages read ``virnuc-dask`` as the command's
do (click would otherwise name it ``python -m virnuc_dask``).
"""

from virnuc_dask.cli import main

if __name__ == "__main__":
    main(prog_name="virnuc-dask")
