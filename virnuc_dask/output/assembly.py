"""The assembly: the final file built from a run's shards, by one code path.

A run's output is built by an :class:`Assembly`: opened from an :class:`AssemblyPlan` (what
the file is made of besides the shards), given each shard as it comes (:meth:`Assembly.add`),
then closed (:meth:`Assembly.close`: row checks, the rename, the upload of outputs at URLs).
``EmbeddingJob.run`` feeds it on the driver while the chunks compute; the Dask graph
(``EmbeddingJob.graph``) ends in :func:`assemble_shards`, which feeds it every shard at once.
Both write the same file through the same steps.

Decisions:

- The plan is small and picklable (paths, settings, the chunks' bounds): it travels to
  wherever the graph's last step runs. An assembly opened without the index in hand reads it
  (and the partition's order) from the work directory, downloaded first when that is a URL;
  the driver passes the index it already holds.
- The per-residue layout (where each sequence's residues go) is computed here, once, from
  the residue counts, the partition's order and the chunks' bounds.
- Outputs at URLs are built in a local folder (the driver's own, or a temporary one) and
  published when complete (:mod:`.publish`); a shard at a URL is read from a local copy.
- With an embedding cache (:mod:`virnuc_dask.cache`), the sequences that are their own
  source but in no chunk were found there: they are looked up again and their values read
  when the assembly opens, before any shard (the driver's lookup is not carried along: the
  graph's last step may run on a worker; a lookup of a million entries reads them in 0.1 s),
  and each computed shard's values are added to it as the shard arrives. A cache that cannot
  take a shard's values is said in a warning; the output does not depend on it. Shards of an
  earlier run (resume) are not added again.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from virnuc_dask.cache.store import CacheError, EmbeddingCache
from virnuc_dask.errors import VirnucError, option
from virnuc_dask.inputs.duplicates import shown_id
from virnuc_dask.output.publish import publish, shard_source, stand_ins
from virnuc_dask.output.residues import ResidueLayout
from virnuc_dask.output.shards import ShardInfo
from virnuc_dask.output.writer import OutputWriter
from virnuc_dask.plan.distinct import distinct_rows
from virnuc_dask.plan.windows import embedded_residues
from virnuc_dask.storage.remote import download_folder, load_npy, place
from virnuc_dask.storage.urls import StorageOptions, is_url

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AssemblyPlan:
    """What a run's output is made of besides its shards.

    Attributes
    ----------
    output, zarr
        The final HDF5 file and the optional Zarr store (paths or URLs).
    index_dir, order_path
        The saved index and the partition's order, in the work directory.
    sources_path
        Each row's source row (:mod:`~virnuc_dask.plan.distinct`), saved in the work
        directory; None: every row is its own source.
    chunk_bounds
        Each chunk's range of the order, in chunk order (the per-residue layout).
    residue_dtype
        Dtype of the per-residue values; None: pooled output only.
    cache, cache_settings
        The embedding cache (folder or URL) and the settings its entries are keyed by
        (:func:`~virnuc_dask.plan.fingerprint.cache_settings`); None: no cache.
    writer
        The rest of :class:`~virnuc_dask.output.writer.OutputWriter`'s settings:
        ``max_residues``, ``layers``, ``width``, ``attrs``, ``dtype``, ``fingerprint``,
        ``overwrite``, ``long``.
    storage
        fsspec options for the URLs among these.
    """

    output: str
    zarr: str | None
    index_dir: str
    order_path: str
    sources_path: str | None
    chunk_bounds: tuple[tuple[int, int], ...]
    residue_dtype: str | None
    writer: dict
    storage: StorageOptions | None = None
    cache: str | None = None
    cache_settings: dict | None = None


class Assembly:
    """The final file of a run, being built: shards go in as they come.

    Parameters
    ----------
    plan
        What the file is made of.
    index, reads, order, sources
        The run's index, the provenance of its peptides (reads), the partition's order and
        each row's source, when the caller holds them; else they are read from the work
        directory.
    folder
        A local folder for the outputs at URLs to be built in; default: a temporary one.
    """

    def __init__(
        self,
        plan: AssemblyPlan,
        *,
        index=None,
        reads=None,
        order=None,
        sources=None,
        folder=None,
    ):
        from virnuc_dask.inputs import FastaIndex
        from virnuc_dask.inputs.provenance import ReadProvenance

        self.plan = plan
        #: Whether the outputs at URLs have been uploaded (by :meth:`close`).
        self.published = False
        #: Sequences whose values came from the embedding cache.
        self.cached = 0
        self._temporary = None
        if folder is None:
            folder = self._temporary = Path(tempfile.mkdtemp(prefix="virnuc-dask-assembly-"))
        try:
            if index is None:
                index_dir = plan.index_dir
                if is_url(index_dir):
                    index_dir = Path(folder) / "assembly-index"
                    download_folder(place(plan.index_dir, plan.storage), index_dir)
                index, reads = FastaIndex.load(index_dir), ReadProvenance.load(index_dir)
            if order is None and (plan.residue_dtype is not None or plan.cache is not None):
                order = load_npy(place(plan.order_path, plan.storage))
            if sources is None and plan.sources_path is not None:
                sources = load_npy(place(plan.sources_path, plan.storage))
            lengths = np.asarray(index.length)
            output = place(plan.output, plan.storage)
            zarr = place(plan.zarr, plan.storage) if plan.zarr else None
            local_output, local_zarr, self._stand_ins = stand_ins(output, zarr, Path(folder))
            self.writer = OutputWriter(
                ids=index.ids(),
                lengths=lengths,
                variables=reads.variables(index.id_bytes, index.id_offsets) if reads else None,
                residues=self._residue_layout(lengths, order, sources),
                output=str(local_output),
                zarr_path=local_zarr,
                sources=sources,
                **plan.writer,
            )
            self._digests = index.digests
            self._cache = None
            if plan.cache is not None:
                self._cache = EmbeddingCache(plan.cache, plan.storage).namespace(
                    plan.cache_settings, create=True
                )
                self._fill_from_cache(index, order, sources)
        except BaseException:
            if hasattr(self, "writer"):
                self.writer.abort()
            self._remove_temporary()
            raise

    def _fill_from_cache(self, index, order: np.ndarray, sources) -> None:
        """Write the values of the sequences found in the cache (in no chunk)."""
        own = distinct_rows(sources) if sources is not None else np.arange(len(index))
        cached = np.setdiff1d(own, order, assume_unique=True)
        if not len(cached):
            return
        hits = self._cache.lookup(index.digests[cached])
        if hits.count < len(cached):
            missing = int(cached[np.flatnonzero(~hits.found)[0]])
            raise CacheError(
                f"{len(cached) - hits.count} of the {len(cached)} sequences this run takes "
                f"from the embedding cache {self.plan.cache} are no longer there (pruned "
                f"meanwhile?), the first {shown_id(index.id(missing))}; run again without "
                f"{option('resume')} (or with {option('restart')}) to embed them"
            )
        for positions, values in hits.blocks():
            self.writer.add_values(cached[positions], values)
        self.cached = len(cached)

    def _residue_layout(self, lengths: np.ndarray, order, sources) -> ResidueLayout | None:
        plan = self.plan
        if plan.residue_dtype is None:
            return None
        counts = embedded_residues(lengths, plan.writer["max_residues"], plan.writer["long"])
        layout = ResidueLayout.from_partition(counts, order, plan.chunk_bounds, plan.residue_dtype)
        return layout if sources is None else layout.shared(sources)

    def add(self, shard: ShardInfo) -> None:
        """Copy a finished shard into the output (a shard at a URL from a local copy), and
        its values into the embedding cache, if any (not those of a resumed shard)."""
        source = shard_source(shard.path, self.plan.storage)
        try:
            rows, values = self.writer.add(shard, source=source)
        finally:
            if not isinstance(source, str):
                source.close()
        if self._cache is not None and shard.worker != "resumed" and len(rows):
            try:
                self._cache.add(self._digests[rows], values)
            except (OSError, VirnucError) as error:
                logger.warning(
                    "the embedding cache %s did not take the values of chunk %d (%s); the "
                    "output is not affected",
                    self.plan.cache,
                    shard.chunk,
                    error,
                )

    def close(self, extra_attrs: dict | None = None) -> str:
        """Check every row, put the outputs in place (upload those at URLs); return the path.

        ``extra_attrs``: attributes known only at the end (the run's phases).
        """
        try:
            path = self.writer.close(extra_attrs=extra_attrs)
            if self._stand_ins:
                publish(self._stand_ins, overwrite=self.plan.writer.get("overwrite", False))
                self.published = True
                path = self.plan.output
            return path
        finally:
            self._remove_temporary()

    def abort(self) -> None:
        """Remove what was written (the shards stay)."""
        try:
            self.writer.abort()
        finally:
            self._remove_temporary()

    def _remove_temporary(self) -> None:
        if self._temporary is not None:
            shutil.rmtree(self._temporary, ignore_errors=True)
            self._temporary = None


def assemble_shards(computed: list[ShardInfo], plan: AssemblyPlan, reused=()) -> str:
    """The graph's last step: the output from the ``computed`` and ``reused`` shards.

    Returns the output's path (its URL for an output at a URL).
    """
    assembly = Assembly(plan)
    try:
        for shard in sorted([*reused, *computed], key=lambda s: s.chunk):
            assembly.add(shard)
        return assembly.close()
    except BaseException:
        assembly.abort()  # after a failed close too: the writer's abort is idempotent
        raise


def assemble(
    shards: list[ShardInfo],
    *,
    ids: list[str],
    lengths: np.ndarray,
    max_residues: int,
    layers: list[int],
    output: str | Path,
    attrs: dict,
    dtype: str = "float32",
    zarr_path: str | Path | None = None,
    fingerprint: str | None = None,
    width: int | None = None,
    overwrite: bool = False,
    variables: dict[str, np.ndarray] | None = None,
    long: str = "truncate",
    residues: ResidueLayout | None = None,
    sources: np.ndarray | None = None,
) -> str:
    """Assemble finished shards into the final file at once: :class:`OutputWriter` in one call.

    For callers that hold every shard and the index in memory (tests, benchmarks); a run
    builds its output through :class:`~virnuc_dask.output.assembly.Assembly`, which feeds
    the same writer.

    Parameters
    ----------
    shards
        Every chunk's :class:`ShardInfo`.
    ids, lengths
        Ids and residue counts of all sequences, in input order.
    max_residues
        Truncation window, for the ``truncated`` flag.
    layers
        The pooled layers (the ``layer`` coordinate when there are several).
    output
        Final HDF5 path; written as a temporary name in the same folder, then renamed.
    attrs
        Attributes of the file; its ``fingerprint`` also goes into the Zarr store's marker.
    dtype
        Stored precision; shards of another dtype are refused.
    zarr_path
        Also write the same content as a Zarr v3 store here.
    fingerprint
        The run's fingerprint; shards with another are refused. None: not checked.
    width
        The embedding width; shards of another are refused. None: every shard must have the
        width of the first (by chunk number).
    overwrite
        Replace an existing output file or Zarr store (one this tool made), once the new one
        is complete. Checked before any work and again just before the rename.
    variables
        More variables along ``sequence`` (a run on reads: the peptides' provenance), as
        :class:`OutputWriter` takes them.
    long, residues, sources
        How long sequences were embedded, the per-residue layout and each row's source, as
        :class:`OutputWriter` takes them.

    Returns
    -------
    str
        The output path.

    Raises
    ------
    ShardMismatch
        A shard belongs to another run, layer set, width or dtype.
    DiskFull
        The disk of an output ran out of space.
    VirnucError
        An output exists (without ``overwrite``) or may not be replaced (:func:`check_target`).
    """
    shards = sorted(shards, key=lambda s: s.chunk)
    if width is None:
        if not shards:
            raise RuntimeError("no shards to assemble")
        with h5py.File(shards[0].path, "r") as f:
            width = f["embedding"].shape[-1]
    with OutputWriter(
        ids=ids,
        lengths=lengths,
        max_residues=max_residues,
        layers=layers,
        width=width,
        output=output,
        attrs=attrs,
        dtype=dtype,
        fingerprint=fingerprint,
        zarr_path=zarr_path,
        overwrite=overwrite,
        variables=variables,
        long=long,
        residues=residues,
        sources=sources,
    ) as writer:
        for shard in shards:
            writer.add(shard)
        return writer.close()
