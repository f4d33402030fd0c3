"""The writer: the final file built while the chunks finish, by one process.

h5py objects cannot cross processes, so one writer (:class:`OutputWriter`) creates the file
with its whole netCDF-4 layout when the run starts (:mod:`.layout`), copies each shard's rows
into it as the shard arrives, checks every row is present exactly once with the id the index
expects, and renames it into place (:mod:`.targets`).

Decisions:

- The work after the last chunk must not grow with the output: the GPUs are idle then. So the
  file is written in place as shards arrive, and closing it is a check of the row counts and a
  rename (0.13 to 0.2 s for 1.2 GB on a 2-core machine, where staging the values and then
  writing the file with xarray took 10 to 16 s: ``benchmarks/assembly.py``).
- No ``msync`` at close, only the unmapping: the mapped pages are the file's page cache, which
  every reader of the file sees; writing them to the disk is left to the kernel, as for any
  write (the earlier writer did not sync the file either). Syncing 1.2 GB of dirty pages took
  2 s, the whole budget of the tail.
- With a Zarr store, its partial is created with the file, and each shard's residue chunks
  go into both as the shard arrives, the same compressed bytes (:mod:`.zarr_store`): at the
  end only the pooled values and the variables along ``sequence`` are written to the store.
- A failure anywhere removes the partial files and keeps the shards, so a run resumes.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import BinaryIO

import h5py
import numpy as np

from virnuc_dask.errors import option
from virnuc_dask.output.layout import add_attributes, create_layout, map_reserved, variable_bytes
from virnuc_dask.output.residues import SHARD_DATASET, ResidueLayout, copy_chunks, same_storage
from virnuc_dask.output.shards import ShardInfo, ShardMismatch, mismatch
from virnuc_dask.output.space import reporting_disk_full
from virnuc_dask.output.targets import (
    OUTPUT,
    ZARR_STORE,
    check_target,
    commit,
    discard,
    fresh_partial,
    partial_name,
)
from virnuc_dask.output.zarr_store import ResidueChunks, hdf5_to_zarr
from virnuc_dask.plan.windows import window_counts

logger = logging.getLogger(__name__)


class OutputWriter:
    """Builds the final file while chunks finish: create, add shards in any order, close.

    At construction the file's whole netCDF-4 layout is written under a hidden partial name
    beside the output (ids, lengths, ``truncated``, the ``layer`` coordinate, attributes), with
    the ``embedding`` variable allocated, contiguous, at a fixed place in the file. Its blocks
    are reserved and memory-mapped, and :meth:`add` copies each shard's rows straight there: no
    staging array, no second copy of the values. A Zarr store's partial is created at the same
    time, and :meth:`add` stores each shard's compressed residue chunks in it too. :meth:`close`
    checks that every row arrived exactly once, writes the rest of the Zarr store if asked, and
    renames into place. So the work left after the last chunk is that check, the store's
    variables along ``sequence`` and the renames, whatever the size of the residues.

    Used as a context manager, leaving the block without :meth:`close` (an exception, or no
    call) aborts: the partial files are removed, the shards are kept.

    Parameters
    ----------
    ids
        Ids of all sequences, in input order: the ``sequence`` coordinate, and what each shard's
        ids must be at its rows.
    lengths
        Residues per sequence (before truncation), in input order.
    max_residues
        Truncation window, for the ``truncated`` flag.
    layers
        The pooled layers: the ``layer`` coordinate when there are several.
    width
        The embedding width; shards of another width are refused.
    output
        The final HDF5 path.
    attrs
        Attributes of the file (netCDF-compatible values); its ``fingerprint`` also goes into
        the Zarr store's ownership marker.
    dtype
        Stored precision; shards of another dtype are refused.
    fingerprint
        The run's fingerprint; shards with another are refused. None: not checked.
    zarr_path
        Also write the same content as a Zarr v3 store here: residue chunks as shards arrive,
        the rest at :meth:`close`.
    overwrite
        Replace an existing output file or Zarr store (one this tool made), once the new one is
        complete. Checked here, before any work, and again just before the rename.
    variables
        More variables along ``sequence``, by name (the reads' provenance): numbers, fixed-width
        bytes (``S``, stored as UTF-8 text) or strings (object arrays, variable-length UTF-8).
    long
        How sequences longer than ``max_residues`` were embedded: ``"truncate"`` (flagged in
        ``truncated``) or ``"window"`` (none truncated; ``windows`` per sequence stored).
    residues
        The per-residue layout (:class:`~virnuc_dask.output.residues.ResidueLayout`): the file
        gets ``residue_start`` and ``residue_embedding``, and every shard must bring its
        residues, whose compressed chunks are copied in as the shard arrives. None: pooled only.

    Raises
    ------
    DiskFull
        The output's disk has no room for the file (its blocks are reserved here).
    VirnucError
        An output exists (without ``overwrite``) or may not be replaced (:func:`check_target`).

    Examples
    --------
    >>> with OutputWriter(ids=ids, lengths=lengths, max_residues=1022, layers=[6], width=320,
    ...                   output="out.h5", attrs={"model": "esm2_t6_8M_UR50D"}) as writer:
    ...     for shard in shards_as_they_finish:
    ...         writer.add(shard)
    ...     path = writer.close()
    """

    def __init__(
        self,
        *,
        ids: list[str],
        lengths: np.ndarray,
        max_residues: int,
        layers: list[int],
        width: int,
        output: str | Path,
        attrs: dict,
        dtype: str = "float32",
        fingerprint: str | None = None,
        zarr_path: str | Path | None = None,
        overwrite: bool = False,
        variables: dict[str, np.ndarray] | None = None,
        long: str = "truncate",
        residues: ResidueLayout | None = None,
        sources: np.ndarray | None = None,
    ) -> None:
        lengths = np.asarray(lengths)
        if len(lengths) != len(ids):
            raise ValueError(f"{len(ids)} ids but {len(lengths)} lengths")
        self._variables = dict(variables or {})
        for name, values in self._variables.items():
            if len(values) != len(ids):
                raise ValueError(f"{len(ids)} ids but {len(values)} values of {name}")
        self._ids = ids
        self._layers = list(layers)
        self._width = int(width)
        self._dtype = np.dtype(dtype)
        self._fingerprint = fingerprint
        self._attrs = dict(attrs)
        self._overwrite = overwrite
        self._output = Path(output)
        self._zarr = None if zarr_path is None else Path(zarr_path)
        check_target(self._output, OUTPUT, overwrite=overwrite)
        if self._zarr is not None:
            check_target(self._zarr, ZARR_STORE, overwrite=overwrite)
        self._seen = np.zeros(len(ids), dtype=np.int32)
        self._copies = _Copies(sources, len(ids))
        self._values: np.memmap | None = None
        self._residues = residues
        self._h5: h5py.File | None = None
        self._partial = partial_name(self._output)
        # The partial store (removed on abort, renamed at close) and its residues' writer.
        self._partials = contextlib.ExitStack()
        self._store: Path | None = None
        self._residue_chunks: ResidueChunks | None = None
        self._state = "open"
        shape = (len(ids), len(self._layers), self._width)
        # The values, the ids, and HDF5's metadata and per-row variables.
        values = int(np.prod(shape)) * self._dtype.itemsize
        self._needed = values + sum(len(i) for i in ids) + 32 * len(ids)
        self._needed += sum(variable_bytes(v) for v in self._variables.values())
        try:
            with reporting_disk_full(self._output, "the output file", self._needed):
                offset = create_layout(
                    self._partial,
                    ids=ids,
                    lengths=lengths,
                    max_residues=max_residues,
                    layers=self._layers,
                    width=self._width,
                    dtype=self._dtype,
                    attrs=self._attrs,
                    variables=self._variables,
                    truncated=(lengths > max_residues) & (long == "truncate"),
                    windows=window_counts(lengths, max_residues, long)
                    if long != "truncate"
                    else None,
                    residues=residues,
                )
                self._values = map_reserved(self._partial, offset, shape, self._dtype)
            if self._zarr is not None:
                with reporting_disk_full(self._zarr, "the Zarr store", self._needed):
                    self._store = self._partials.enter_context(
                        fresh_partial(self._zarr, ZARR_STORE, self._attrs)
                    )
                    if residues is not None:
                        self._residue_chunks = ResidueChunks(self._partial, self._store)
            with reporting_disk_full(self._output, "the output file", self._needed):
                if residues is not None:
                    # The residues' chunks are written through HDF5 (the embedding's bytes,
                    # at their fixed place, through the map: HDF5 never writes those).
                    self._h5 = h5py.File(self._partial, "r+")
        except BaseException:
            self.abort()
            raise

    def __enter__(self) -> OutputWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.abort()

    @property
    def partial(self) -> Path:
        """The hidden file being written, renamed to the output path by :meth:`close`."""
        return self._partial

    def add(
        self, shard: ShardInfo, source: str | Path | BinaryIO | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Validate a shard and write its rows into the file now; return its rows and values.

        Nothing of a refused shard is written, and the writer stays usable: its rows still
        count as missing at :meth:`close`.

        Parameters
        ----------
        shard
            A finished chunk's shard, in any order relative to the others.
        source
            Where to read it instead of ``shard.path``, e.g. the bytes of a shard at a URL
            (:func:`~virnuc_dask.output.publish.shard_source`); messages still name the path.

        Raises
        ------
        ShardMismatch
            The shard belongs to another run, layer set, width or dtype.
        RuntimeError
            The shard is misaligned: its ids are not the ids the index expects at its rows.
        """
        self._require_open()
        with h5py.File(shard.path if source is None else source, "r") as f:
            problem = mismatch(
                f,
                fingerprint=self._fingerprint,
                layers=self._layers,
                width=self._width,
                dtype=self._dtype,
            )
            if problem:
                raise ShardMismatch(
                    f"shard {shard.path} does not belong to this run: its {problem}. Nothing "
                    "was written and the run's shards are kept; running again with "
                    f"{option('resume')} recomputes the shards that do not match"
                )
            rows = f["rows"][:]
            shard_ids = f["ids"].asstr()[:]
            embedding = f["embedding"][:]
            self._check_alignment(shard, rows, shard_ids, embedding)
            if self._residues is not None:
                self._add_residues(shard, f, rows)
        self._put(rows, embedding)
        return rows, embedding

    def add_values(self, rows: np.ndarray, embedding: np.ndarray) -> None:
        """Write the pooled values of ``rows`` that come from elsewhere (an embedding cache).

        ``embedding``: shape ``(len(rows), layers, width)``, in the output's dtype. The rows
        that share a source among ``rows`` get the same values.
        """
        self._require_open()
        rows = np.asarray(rows, dtype=np.int64)
        expected = (len(rows), len(self._layers), self._width)
        if embedding.shape != expected or embedding.dtype != self._dtype:
            raise ValueError(
                f"values of shape {embedding.shape} and dtype {embedding.dtype}, the output "
                f"takes {expected} of {self._dtype}"
            )
        self._put(rows, embedding)

    def _put(self, rows: np.ndarray, embedding: np.ndarray) -> None:
        """Write the values of source rows, and copy them to the rows that share them."""
        copies, of = self._copies.of(rows)
        if self._values is not None:
            self._values[rows] = embedding
            if len(copies):
                self._values[copies] = embedding[of]
        # add.at counts a row listed twice in one shard twice; ``seen[rows] += 1`` would not.
        np.add.at(self._seen, rows, 1)
        np.add.at(self._seen, copies, 1)

    def close(self, extra_attrs: dict | None = None) -> str:
        """Check that every row arrived exactly once, finish the outputs and rename them.

        The Zarr store, when asked, gets here what its residue chunks lack, from the finished
        HDF5 file. Whatever fails, the partial files are removed (the writer is aborted) and
        no output appears.

        Parameters
        ----------
        extra_attrs
            More attributes for the file (and the store), known only at the end, such as the
            run's timing phases; they replace attributes of the same name.

        Returns
        -------
        str
            The output path.

        Raises
        ------
        RuntimeError
            Rows are missing, or arrived more than once.
        DiskFull
            The disk ran out of space while writing the attributes or the Zarr store.
        VirnucError
            An output appeared meanwhile (without ``overwrite``), see :func:`check_target`.
        """
        self._require_open()
        clock, steps = time.perf_counter(), []

        def step(name: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            steps.append(f"{name} {now - clock:.2f} s")
            clock = now

        try:
            self._require_every_row_once()
            step("check")
            self._unmap()
            step("unmap")
            attrs = {**self._attrs, **(extra_attrs or {})}
            if extra_attrs:
                needed = 4096 + len(repr(extra_attrs))
                with reporting_disk_full(self._output, "the output file", needed):
                    add_attributes(self._partial, extra_attrs)
                step("attributes")
            written = [(self._partial, self._output, OUTPUT)]
            if self._store is not None:
                with reporting_disk_full(self._zarr, "the Zarr store", self._needed):
                    hdf5_to_zarr(self._partial, self._store, self._ids, attrs, self._variables)
                written.append((self._store, self._zarr, ZARR_STORE))
                step("zarr")
            commit(written, overwrite=self._overwrite)
            step("rename")
            self._partials.close()  # the store was renamed away: nothing left to remove
        except BaseException:
            self.abort()
            raise
        self._state = "closed"
        logger.debug("output closed: %s", ", ".join(steps))
        return str(self._output)

    def abort(self) -> None:
        """Remove the partial file; nothing appears at the output path. Idempotent.

        After a successful :meth:`close` it does nothing: the output stays.
        """
        self._unmap()
        if self._state == "closed":
            return
        self._state = "aborted"
        discard(self._partial)
        self._partials.close()

    def _require_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"the writer of {self._output} is {self._state}")

    def _check_alignment(self, shard, rows, shard_ids, embedding) -> None:
        """Refuse a shard whose rows, ids and values do not line up with the index."""
        if not len(rows) == len(shard_ids) == len(embedding):
            raise RuntimeError(
                f"shard {shard.path} is misaligned: it holds {len(rows)} rows, "
                f"{len(shard_ids)} ids and {len(embedding)} vectors"
            )
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self._ids)):
            raise RuntimeError(
                f"shard {shard.path} is misaligned: its rows run from {rows.min()} to "
                f"{rows.max()}, the index has {len(self._ids)}"
            )
        expected = [self._ids[r] for r in rows]
        if list(shard_ids) != expected:
            bad = next(
                i for i, (a, b) in enumerate(zip(shard_ids, expected, strict=True)) if a != b
            )
            raise RuntimeError(
                f"shard {shard.path} is misaligned: row {rows[bad]} holds {shard_ids[bad]!r}, "
                f"the index says {expected[bad]!r}"
            )

    def _add_residues(self, shard: ShardInfo, f: h5py.File, rows: np.ndarray) -> None:
        """Copy a shard's compressed residue chunks into its region of the file."""
        if SHARD_DATASET not in f:
            raise ShardMismatch(
                f"shard {shard.path} does not belong to this run: it holds no per-residue "
                "values. Nothing was written and the run's shards are kept"
            )
        target = self._h5["residue_embedding"]
        problem = same_storage(f[SHARD_DATASET], target)
        if problem:
            raise ShardMismatch(f"shard {shard.path} does not belong to this run: its {problem}")
        if not np.array_equal(f["residue_counts"][:], self._residues.counts[rows]):
            raise RuntimeError(
                f"shard {shard.path} is misaligned: its residue counts are not the index's"
            )
        region = self._residues.region(rows)
        needed = f[SHARD_DATASET].id.get_storage_size()
        also = None
        if self._residue_chunks is not None:

            def also(first_row: int, data: bytes) -> None:
                with reporting_disk_full(self._zarr, "the Zarr store", needed):
                    self._residue_chunks.put(first_row, data)

        with reporting_disk_full(self._output, "the output file", needed):
            copy_chunks(f, target, region, self._residues.chunk_rows, also)

    def _require_every_row_once(self) -> None:
        missing = np.flatnonzero(self._seen == 0)
        doubled = np.flatnonzero(self._seen > 1)
        if len(missing) or len(doubled):
            ids = self._ids
            raise RuntimeError(
                f"assembly found {len(missing)} sequences missing and {len(doubled)} embedded "
                f"more than once (first missing: {[ids[i] for i in missing[:3]]}, first "
                f"doubled: {[ids[i] for i in doubled[:3]]})"
            )

    def _unmap(self) -> None:
        # Dropping the last reference unmaps; no msync (see the module's decisions).
        self._values = None
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None


class _Copies:
    """The rows that get another row's values, looked up by their source.

    Parameters
    ----------
    sources
        Each row's source row (None: every row is its own).
    count
        Rows of the output.
    """

    def __init__(self, sources: np.ndarray | None, count: int) -> None:
        if sources is None:
            sources = np.arange(count, dtype=np.int64)
        sources = np.asarray(sources, dtype=np.int64)
        if len(sources) != count:
            raise ValueError(f"{count} ids but {len(sources)} sources")
        copies = np.flatnonzero(sources != np.arange(count))
        if len(copies) and not np.array_equal(sources[sources[copies]], sources[copies]):
            raise ValueError("a source row has a source of its own")
        by_source = np.argsort(sources[copies], kind="stable")
        self._rows = copies[by_source]  # the copies, grouped by source
        self._sources = sources[self._rows]  # their sources, ascending

    def of(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The copies of ``rows``, and for each the position in ``rows`` of its source."""
        first = np.searchsorted(self._sources, rows, side="left")
        counts = np.searchsorted(self._sources, rows, side="right") - first
        total = int(counts.sum())
        if not total:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
        of = np.repeat(np.arange(len(rows)), counts)
        runs = np.repeat(first - (np.cumsum(counts) - counts), counts)
        return self._rows[runs + np.arange(total)], of
