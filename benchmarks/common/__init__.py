"""What several benchmarks share; nothing here is a benchmark of its own.

The scripts in ``benchmarks/`` are run as files (``python benchmarks/job_wall.py``), so this
folder is importable as ``common`` from any of them. One module per idea:

- ``machine``: where a benchmark ran (platform, GPUs, package versions);
- ``workloads``: the job benchmarks' peptide sets (``viral`` and its first 100, ``small``);
- ``checkpoints``: random-weight checkpoints written in fair-esm's format, so that jobs load
  their weights by name through the real loading path;
- ``work``: the work folder of the job benchmarks (environment, inputs, checkpoints);
- ``children``: running one function in a fresh process that answers one line of JSON;
- ``gpu_sampler``: the GPUs' utilisation, sampled from ``nvidia-smi`` while a job runs;
- ``cli_job``: one ``virnuc-dask embed`` command as a fresh process, timed, with its timeline
  and the phases its output records;
- ``options``: the flags the job benchmarks share;
- ``results``: the job benchmarks' results file (merging, steady rates, targets);
- ``tables``: the tables those benchmarks print.
"""
