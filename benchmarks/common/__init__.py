"""What several benchmarks share; nothing here is a benchmark of its own.

The scripts in ``benchmarks/`` are run as files (``python benchmarks/job_wall.py``), so this
folder is importable as ``common`` from any of them. One module per idea:

- ``machine``: where a benchmark ran (platform, GPUs, package versions).
"""
