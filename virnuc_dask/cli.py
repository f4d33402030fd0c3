"""Command line: ``virnuc-dask embed``. It only translates flags and calls the library.

Options have no defaults of their own: an option not given is passed as ``None`` and the value
comes from the one place defaults live, the ``virnuc-dask`` section of Dask's configuration
(``virnuc_dask/virnuc-dask.yaml``, overridable in the user's Dask YAML files or with
``DASK_VIRNUC_DASK__<NAME>`` variables). A flag given on the command line wins over both.
"""

from __future__ import annotations

import logging
import signal
import sys
import warnings

import click

from virnuc_dask.config import DTYPES, OUTPUT_DTYPES
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
        with command_line_spelling():
            storage = StorageOptions.parse(storage_options) if storage_options else None
            path = run(
                list(inputs),
                output,
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
    except VirnucError as error:
        click.echo(f"virnuc-dask: error: {error}", err=True)
        sys.exit(2)
    except KeyboardInterrupt as error:
        # An interrupted run says what it kept (Interrupted); one stopped earlier kept nothing.
        with command_line_spelling():
            said = str(error) if isinstance(error, Interrupted) else "interrupted"
        click.echo(f"virnuc-dask: {said}", err=True)
        sys.exit(130)
    click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
