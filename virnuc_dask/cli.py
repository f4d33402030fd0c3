"""Command line: ``virnuc-dask embed`` and ``virnuc-dask cache info|verify|prune``.

It only translates flags and calls the library.

Options have no defaults of their own: an option not given is passed as ``None`` and the value
comes from the one place defaults live, the ``virnuc-dask`` section of Dask's configuration
(``virnuc_dask/virnuc-dask.yaml``, overridable in the user's Dask YAML files or with
``DASK_VIRNUC_DASK__<NAME>`` variables). A flag given on the command line wins over both.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import sys
import warnings

import click

from virnuc_dask.config import CLUSTERS, DTYPES, OUTPUT_DTYPES
from virnuc_dask.errors import Interrupted, VirnucError, command_line_spelling
from virnuc_dask.inputs.duplicates import DUPLICATE_POLICIES
from virnuc_dask.inputs.peptides import TRANSLATIONS
from virnuc_dask.inputs.translate import DEFAULT_MIN_ORF, FRAME_MODES
from virnuc_dask.model.registry import DEFAULT_MODEL, MODELS
from virnuc_dask.plan.windows import LONG_MODES
from virnuc_dask.storage.urls import StorageOptions


def _layers(ctx, param, values: tuple[str, ...]) -> tuple[int, ...] | None:
    try:
        layers = tuple(int(v) for value in values for v in value.split(",") if v)
    except ValueError:
        raise click.BadParameter(
            "layers are whole numbers, e.g. --layers 33 or --layers 30,33"
        ) from None
    return layers or None


class _Messages(logging.Formatter):
    """The tool's own news plain (the summary, resume counts); warnings and Dask's lines named."""

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno == logging.INFO and record.name.startswith("virnuc_dask"):
            return record.getMessage()
        return f"{record.levelname} {record.name}: {record.getMessage()}"


def _configure_logging(verbose: bool) -> None:
    """Default and ``--quiet``: the tool's messages and everyone's warnings; Dask's INFO lines
    (scheduler, nanny and client of a local cluster, all in this process) only with
    ``--verbose``.

    ``distributed`` gives its loggers handlers and levels of their own when it is imported, so
    a level on the root logger does not reach them: it is set on theirs, after the import.
    """
    handler = logging.StreamHandler()
    handler.setFormatter(_Messages())
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("virnuc_dask").setLevel(logging.DEBUG if verbose else logging.INFO)
    import distributed  # noqa: F401 (sets up its loggers now, not later over ours)

    if not verbose:
        logging.getLogger("distributed").setLevel(logging.WARNING)
        # The dashboard link printed at the start names the port the dashboard really took.
        warnings.filterwarnings("ignore", r"Port \d+ is already in use", UserWarning)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@click.group()
@click.version_option(package_name="virnuc-dask")
def main() -> None:
    """ESM-2 protein embeddings for millions of sequences, on every GPU, through Dask."""


@main.command()
# Inputs are plain strings: the index checks each path and says what is wrong in our format.
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", required=True, type=click.Path(), help="HDF5 file to write.")
@click.option(
    "--model",
    type=click.Choice(list(MODELS)),
    help=f"fair-esm model name; weights from the torch hub cache. [default: {DEFAULT_MODEL}]",
)
@click.option("--checkpoint", type=click.Path(), help="Checkpoint file in fair-esm's format.")
@click.option(
    "--random-weights",
    is_flag=True,
    default=None,
    help="Seeded random weights of the architecture (smoke tests; not a real model).",
)
@click.option("--seed", type=int, help="Seed of --random-weights. [default: 0]")
@click.option(
    "--layers",
    multiple=True,
    callback=_layers,
    help="Layers to pool, as fair-esm numbers them (default: the last). Repeat or "
    "separate by commas.",
)
@click.option(
    "--dtype",
    type=click.Choice(DTYPES),
    help="Compute precision; auto is bf16 on GPU, fp32 on CPU. [default: auto]",
)
@click.option(
    "--output-dtype", type=click.Choice(OUTPUT_DTYPES), help="Stored precision. [default: float32]"
)
@click.option(
    "--max-residues",
    type=int,
    help="Residues kept per sequence; longer ones are truncated and flagged. [default: 1022]",
)
@click.option("--tokens-per-batch", type=int, help="Token budget of one forward pass.")
@click.option("--chunk-tokens", type=int, help="Token budget of one task (one shard file).")
@click.option("--workers", type=int, help="Workers of the local cluster.")
@click.option(
    "--cluster",
    type=click.Choice(CLUSTERS),
    help="Where the workers come from: a local cluster, Slurm jobs (dask-jobqueue), or the "
    "tasks of this srun (rank 0 the scheduler and driver). [default: local]",
)
@click.option(
    "--slurm-jobs", type=int, help="--cluster slurm: most worker jobs at once. [default: 4]"
)
@click.option(
    "--slurm-gpus",
    type=int,
    help="--cluster slurm: GPUs a job, one worker each; 0: CPU workers. [default: 1]",
)
@click.option("--slurm-cores", type=int, help="--cluster slurm: CPU cores a job.")
@click.option("--slurm-memory", help="--cluster slurm: memory a job (e.g. 64GB).")
@click.option("--slurm-partition", help="--cluster slurm: the partition of the worker jobs.")
@click.option("--slurm-account", help="--cluster slurm: the account the jobs are charged to.")
@click.option("--slurm-walltime", help="--cluster slurm: walltime of a worker job (HH:MM:SS).")
@click.option(
    "--slurm-option",
    multiple=True,
    metavar="OPTION",
    help="--cluster slurm: one more #SBATCH option of the worker jobs (repeat): --qos=high.",
)
@click.option("--scheduler", help="Address of a running Dask scheduler.")
@click.option("--scheduler-file", type=click.Path(), help="Scheduler file of a running cluster.")
@click.option("--zarr", type=click.Path(), help="Also write a Zarr v3 store here (path or URL).")
@click.option(
    "--work-dir", type=click.Path(), help="Work directory, path or URL (default: OUTPUT.work)."
)
@click.option(
    "--storage-options",
    metavar="JSON|@FILE",
    help="fsspec options for URLs (endpoint, region, profile), as JSON or @FILE; credentials "
    "only in a file, a profile or the environment.",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Reuse finished chunks of an interrupted run (same inputs and settings).",
)
@click.option(
    "--restart",
    is_flag=True,
    help="Discard the finished chunks an earlier run left in the work directory.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace an existing output (the old one stays until the new one is complete).",
)
@click.option(
    "--invalid-to-x",
    is_flag=True,
    default=None,
    help="Read letters outside ESM-2's alphabet as X instead of stopping.",
)
@click.option(
    "--as-protein",
    is_flag=True,
    default=None,
    help="Embed a protein file whose letters are those of DNA or RNA, instead of refusing it.",
)
@click.option(
    "--duplicate-ids",
    type=click.Choice(DUPLICATE_POLICIES),
    help="Refuse repeated ids, or keep them as ID.2, ID.3, ... [default: error]",
)
@click.option(
    "--translate",
    type=click.Choice(TRANSLATIONS),
    help="The inputs are nucleotide reads (FASTA or FASTQ, DNA or RNA): embed the peptides of "
    "their six-frame translation, named <read><frame> as VirNucPro names them.",
)
@click.option("--genetic-code", type=int, help="NCBI translation table. [default: 1]")
@click.option(
    "--frames",
    type=click.Choice(FRAME_MODES),
    help="stop-free: whole frames without a stop codon (VirNucPro); orfs: the pieces of every "
    "frame between stop codons. [default: stop-free]",
)
@click.option(
    "--min-peptide",
    type=int,
    help=f"Shortest peptide kept. [default: 1 for stop-free, {DEFAULT_MIN_ORF} for orfs]",
)
@click.option(
    "--split-bp",
    type=int,
    help="First cut reads longer than N bases into pieces of N bases, named <read>_chunk_<k> "
    "(VirNucPro's chunks).",
)
@click.option(
    "--per-residue",
    is_flag=True,
    default=None,
    help="Also store every residue's embedding (residue_embedding, indexed by residue_start).",
)
@click.option(
    "--residue-dtype",
    type=click.Choice(OUTPUT_DTYPES),
    help="Stored precision of --per-residue values. [default: float16]",
)
@click.option(
    "--long",
    type=click.Choice(LONG_MODES),
    help="Sequences longer than --max-residues: truncate (first 1022 residues, flagged) or "
    "window (all residues, overlapping windows blended). [default: truncate]",
)
@click.option(
    "--dedup/--no-dedup",
    default=None,
    help="Embed each distinct sequence once; its duplicates (equal letters, in any case) get "
    "its values. [default: dedup]",
)
@click.option(
    "--cache",
    metavar="DIR|URL",
    help="Embedding cache shared across runs: sequences found there are not embedded again, "
    "new ones are added (pooled embeddings only).",
)
@click.option(
    "--chunk-time-limit",
    type=float,
    help="Seconds a chunk may run before its worker is restarted and the chunk retried "
    "(0: none). [default: 10x its expected time]",
)
@click.option(
    "--compile/--no-compile",
    default=None,
    help="torch.compile the GPU engine's layer (default: only for large jobs on workers "
    "without Triton; with Triton, fused kernels run as fast and need no compile).",
)
@click.option(
    "--quiet",
    is_flag=True,
    help="No progress bar and no Dask messages; the summary and warnings stay.",
)
@click.option(
    "--verbose", is_flag=True, help="Also say where the time went (index, model load, ...)."
)
def embed(
    inputs,
    output,
    cluster,
    slurm_jobs,
    slurm_gpus,
    slurm_cores,
    slurm_memory,
    slurm_partition,
    slurm_account,
    slurm_walltime,
    slurm_option,
    scheduler,
    scheduler_file,
    zarr,
    work_dir,
    resume,
    restart,
    overwrite,
    storage_options,
    quiet,
    verbose,
    **settings,
):
    """Embed the sequences of INPUT FASTA files (plain or gzip) into one HDF5 file.

    An INPUT, -o, --zarr and --work-dir may be fsspec URLs (s3://, gs://; https:// for
    inputs); - reads standard input.

    With --translate six-frame, INPUT files are nucleotide reads (FASTA or FASTQ, plain or
    gzip) and their peptides are embedded.

    Defaults of the options come from Dask's configuration (section virnuc-dask).
    """
    _configure_logging(verbose)  # before the run's modules import distributed
    from virnuc_dask.run.embed import embed as run

    # SIGTERM (a scheduler's preemption, `kill`) ends the run like Ctrl-C: the local cluster
    # is closed, locks are released and finished shards stay for --resume.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with _user_errors():
            storage = StorageOptions.parse(storage_options) if storage_options else None
            slurm = {
                "jobs": slurm_jobs,
                "gpus_per_job": slurm_gpus,
                "cores": slurm_cores,
                "memory": slurm_memory,
                "partition": slurm_partition,
                "account": slurm_account,
                "walltime": slurm_walltime,
                "job_extra": list(slurm_option) or None,
            }
            slurm = {name: value for name, value in slurm.items() if value is not None}
            path = run(
                list(inputs),
                output,
                cluster=cluster,
                slurm=slurm or None,
                scheduler=scheduler,
                scheduler_file=scheduler_file,
                zarr=zarr,
                work_dir=work_dir,
                resume=resume,
                restart=restart,
                overwrite=overwrite,
                progress=not quiet,
                storage_options=storage,
                **settings,
            )
    except KeyboardInterrupt as error:
        # An interrupted run says what it kept (Interrupted); one stopped earlier kept nothing.
        with command_line_spelling():
            said = str(error) if isinstance(error, Interrupted) else "interrupted"
        click.echo(f"virnuc-dask: {said}", err=True)
        sys.exit(130)
    if path is not None:  # None: a worker rank of --cluster slurm-allocation
        click.echo(f"wrote {path}")


# -- virnuc-dask cache ----------------------------------------------------------------------

#: Seconds in each unit ``--older-than`` takes.
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

#: Bytes in each unit ``--max-size`` takes (decimal and binary; case does not matter).
_SIZE_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def _age(ctx, param, value: str | None) -> float | None:
    if value is None:
        return None
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", value.lower())
    if not found:
        raise click.BadParameter("an age is a number and a unit: 90m, 12h, 30d (also s, w)")
    return float(found.group(1)) * _AGE_UNITS[found.group(2)]


def _size(ctx, param, value: str | None) -> int | None:
    if value is None:
        return None
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", value.lower())
    if not found or found.group(2) not in _SIZE_UNITS:
        raise click.BadParameter("a size is a number and a unit: 500MB, 50GB (also kB, TB, GiB)")
    return int(float(found.group(1)) * _SIZE_UNITS[found.group(2)])


@contextlib.contextmanager
def _user_errors():
    """A :class:`VirnucError` becomes its message on stderr and exit status 2; within, options
    are spelled as flags."""
    try:
        with command_line_spelling():
            yield
    except VirnucError as error:
        click.echo(f"virnuc-dask: error: {error}", err=True)
        sys.exit(2)


def _open_cache(location: str, storage_options: str | None):
    from virnuc_dask.cache import EmbeddingCache

    storage = StorageOptions.parse(storage_options) if storage_options else None
    return EmbeddingCache(location, storage)


def _cache_logging() -> None:
    """The cache's warnings (an entry skipped) as the embed command shows them."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(_Messages())
        root.addHandler(handler)


_storage_option = click.option(
    "--storage-options",
    metavar="JSON|@FILE",
    help="fsspec options for a URL (endpoint, region, profile), as JSON or @FILE; credentials "
    "only in a file, a profile or the environment.",
)


@main.group()
def cache() -> None:
    """The shared cache of pooled embeddings: what it holds, checks, pruning.

    LOCATION is the cache's folder or an fsspec URL (s3://bucket/cache).
    """


@cache.command("info")
@click.argument("location")
@_storage_option
def cache_info(location, storage_options):
    """What the cache at LOCATION holds, namespace by namespace (model, layers, sequences)."""
    from virnuc_dask.cache import info

    _cache_logging()
    with _user_errors():
        found = info(_open_cache(location, storage_options))
    for line in found.describe():
        click.echo(line)


@cache.command("verify")
@click.argument("location")
@_storage_option
def cache_verify(location, storage_options):
    """Check every segment of the cache at LOCATION against its entry (reads them all).

    Exits with status 1 when a segment or entry is damaged; orphans (files no entry names,
    never used) and entries of another format are listed but are not damage.
    """
    from virnuc_dask.cache import verify

    _cache_logging()
    with _user_errors():
        problems = verify(_open_cache(location, storage_options))
    for problem in problems:
        click.echo(str(problem))
    damaged = sum(p.damaged for p in problems)
    if damaged:
        click.echo(
            f"{damaged} damaged; remove {'it' if damaged == 1 else 'them'} with "
            f"virnuc-dask cache prune --damaged {location}",
            err=True,
        )
        sys.exit(1)
    click.echo(f"no damage found in {location}")


@cache.command("prune")
@click.argument("location")
@click.option(
    "--older-than", callback=_age, metavar="AGE", help="Remove entries older than this (30d)."
)
@click.option(
    "--max-size",
    callback=_size,
    metavar="SIZE",
    help="Then remove the oldest entries until the cache holds at most this (50GB).",
)
@click.option("--damaged", is_flag=True, help="Remove the entries verify finds damaged.")
@click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
@_storage_option
def cache_prune(location, older_than, max_size, damaged, dry_run, storage_options):
    """Remove old, surplus or damaged entries of the cache at LOCATION, and old orphans.

    Orphans (segments no entry names) an hour old or more are always removed; younger ones
    may be a writer between its two writes.
    """
    from virnuc_dask.cache import prune

    _cache_logging()
    with _user_errors():
        report = prune(
            _open_cache(location, storage_options),
            older_than=older_than,
            max_bytes=max_size,
            damaged=damaged,
            dry_run=dry_run,
        )
    for line in report.describe():
        click.echo(line)


if __name__ == "__main__":
    main()
