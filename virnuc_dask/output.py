"""Output: the one module that owns files on disk: shards, the final HDF5, and Zarr.

A *shard* is one chunk's result, an HDF5 file written to a temporary name and renamed, so a
retried or resumed task never leaves half a shard. It holds the input rows it covers, their ids
(as read by the worker, so that assembly can prove the alignment), the pooled embeddings, and
what they are: the run's fingerprint, the pooled layers and the width.

The *final file* is built while the chunks finish, by one writer (:class:`OutputWriter`; h5py
objects cannot cross processes): created with its whole netCDF-4 layout when the run starts,
each shard's rows copied into it as the shard arrives, every row checked to be present exactly
once with the id the index expects, and renamed into place. Layout (``docs/output.md``):

- ``embedding`` (``sequence``, ``feature``) or (``sequence``, ``layer``, ``feature``), float32
  or float16, contiguous;
- ``sequence``: the ids, variable-length UTF-8, a dimension scale (``ds.sel(sequence=ID)``);
- ``length`` (residues before truncation), ``truncated`` (bool);
- for a run on reads, the peptides' provenance as coordinates along ``sequence`` (``read``,
  ``frame``, ``strand``, ``nt_start``, ``nt_end``, ...), given by the caller;
- attributes: model, layers, pooling, compute dtype, weights source, versions, inputs, time.

Decisions:

- The work after the last chunk must not grow with the output: the GPUs are idle then. So the
  file is written in place as shards arrive, and closing it is a check of the row counts and a
  rename (0.13 to 0.2 s for 1.2 GB on a 2-core machine, where staging the values and then
  writing the file with xarray took 10 to 16 s: ``benchmarks/assembly.py``). The layout is
  written through h5netcdf as xarray writes it, so xarray opens it without warnings; the
  ``embedding`` variable alone is created contiguous, allocated at once and never filled, so
  that its bytes have one fixed offset in the file, which is memory-mapped and written with
  each shard's rows: no staging array, no second copy. Contiguous rather than chunked by rows:
  a chunked variable's chunks have no place in the file until HDF5 writes them.
- Those bytes are reserved (``posix_fallocate``) before they are mapped: a write to a mapped
  page that the disk has no room for is a SIGBUS that kills the process, while the reservation
  fails with ENOSPC, which becomes :class:`DiskFull`, like ENOSPC or EDQUOT anywhere in the
  netCDF or Zarr writing. So a full disk stops the run when it starts, not after the compute.
  Partial files are removed; the shards stay.
- The Zarr store, when asked, is written at the end from the finished file: its chunks are
  compressed blocks of rows, and the rows of a block arrive from many chunks (the partition
  deals rows by length), so a block is complete only at the end.
- No ``msync`` at close, only the unmapping: the mapped pages are the file's page cache, which
  every reader of the file sees; writing them to the disk is left to the kernel, as for any
  write (the earlier writer did not sync the file either). Syncing 1.2 GB of dirty pages took
  2 s, the whole budget of the tail.
- A shard of another run (fingerprint), another layer set, width or dtype is refused
  (:class:`ShardMismatch`), never cast or broadcast into the output: a width-1 shard would
  otherwise fill every feature of its rows with one number.
- Outputs are written to hidden siblings (``.NAME.<hex>.partial``, a Zarr one marked with the
  :mod:`~virnuc_dask.ownership` marker from its creation) and renamed into place only when both
  are complete, so both appear or neither does, and an existing output stays intact until it is
  replaced. :func:`check_target` says what may be replaced: an existing file or Zarr store
  only with ``overwrite``, a folder without the tool's marker never, a symbolic link never.
- Ids are variable-length strings on disk and object arrays in memory: a fixed-width numpy
  string array is as wide as the longest id, so one 1 MB id made 301 ids take 1.2 GB.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from virnuc_dask import ownership
from virnuc_dask.errors import VirnucError, option

logger = logging.getLogger(__name__)

#: How the vectors are pooled, recorded in every output file.
POOLING = "mean over residues, BOS/EOS excluded"
#: Rows per HDF5/Zarr chunk of the final file.
ROWS_PER_CHUNK = 4096
#: The kinds of target :func:`check_target` knows; the Zarr one is also its ownership kind.
OUTPUT = "output"
ZARR_STORE = "zarr store"

_OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT)
#: What zarr-python says on listing a store folder that holds the ownership marker.
_MARKER_WARNING = f"Object at {re.escape(ownership.MARKER)} is not recognized"
#: HDF5 reports a failed write in its message, sometimes without setting ``errno``.
_HDF5_OUT_OF_SPACE = re.compile(rf"errno = ({errno.ENOSPC}|{errno.EDQUOT})\b")
#: Why a hard link may fail other than an existing name: the filesystem has none.
_NO_HARD_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK)


class ShardMismatch(VirnucError):
    """A shard does not belong to the run being assembled.

    Its fingerprint, layers, width or dtype differ from the run's. Nothing is written and the
    run's shards are kept; a resumed run recomputes the shards that do not match.
    """


class DiskFull(VirnucError):
    """The disk (or the user's quota) ran out of space while assembling.

    Partial files are removed and the finished shards kept, so that the run can resume, without
    recomputing, once there is space.
    """


@dataclass(frozen=True)
class ShardInfo:
    """What a finished chunk task returns: where its shard is and what it holds."""

    chunk: int
    path: str
    sequences: int
    tokens: int
    worker: str
    seconds: float


def write_shard(
    path: str | Path,
    *,
    rows: np.ndarray,
    ids: list[str],
    embedding: np.ndarray,
    fingerprint: str,
    layers: list[int] | None = None,
    dtype: str = "float32",
) -> None:
    """Write one chunk's result atomically: a temporary file in the same folder, then a rename.

    Parameters
    ----------
    path
        The shard's final path.
    rows
        The input rows the shard covers, in the order of ``ids`` and ``embedding``.
    ids
        The ids of those rows as the worker read them.
    embedding
        Pooled vectors, shape ``(len(rows), len(layers), width)``.
    fingerprint
        The run's fingerprint.
    layers
        The pooled layers, recorded so that assembly and resume can refuse other layer sets;
        not recorded when None.
    dtype
        Stored precision.
    """
    path = Path(path)
    embedding = np.asarray(embedding)
    if embedding.ndim != 3 or (layers is not None and embedding.shape[1] != len(layers)):
        raise ValueError(
            f"embedding of shape {embedding.shape} is not (rows, {len(layers or ()) or 'layers'}"
            ", width)"
        )
    partial = _partial_name(path)
    try:
        with h5py.File(partial, "w") as f:
            f.attrs["fingerprint"] = fingerprint
            f.attrs["width"] = embedding.shape[2]
            if layers is not None:
                f.attrs["layers"] = np.asarray(layers, dtype=np.int64)
            f.create_dataset("rows", data=np.asarray(rows, dtype=np.int64))
            f.create_dataset("ids", data=np.array(ids, dtype=object), dtype=h5py.string_dtype())
            f.create_dataset("embedding", data=embedding.astype(dtype, copy=False))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def shard_matches(
    path: str | Path,
    fingerprint: str,
    rows: np.ndarray,
    *,
    layers: list[int] | None = None,
    width: int | None = None,
    dtype: str | None = None,
) -> bool:
    """Whether a shard on disk is complete and belongs to this run and these rows.

    Parameters
    ----------
    path
        The shard.
    fingerprint
        The run's fingerprint.
    rows
        The rows the chunk covers, in order.
    layers, width, dtype
        When given, the shard must also hold these layers (count, and numbers if it recorded
        them), this width and this dtype.
    """
    try:
        with h5py.File(path, "r") as f:
            return (
                _mismatch(f, fingerprint=fingerprint, layers=layers, width=width, dtype=dtype)
                is None
                and f["embedding"].shape[0] == len(rows)
                and np.array_equal(f["rows"][:], rows)
            )
    except (OSError, KeyError):
        return False


def _mismatch(f: h5py.File, *, fingerprint, layers, width, dtype) -> str | None:
    """What makes an open shard foreign to the run, in words; None when nothing does."""
    stored = f["embedding"]
    if fingerprint is not None and f.attrs.get("fingerprint") != fingerprint:
        return (
            f"fingerprint is {f.attrs.get('fingerprint')!r}, the run's {fingerprint!r} (another "
            "run's inputs or settings)"
        )
    if layers is not None:
        if stored.ndim != 3 or stored.shape[1] != len(layers):
            held = stored.shape[1] if stored.ndim == 3 else "no"
            return f"layers differ: it holds {held} per row, the run pools {list(layers)}"
        recorded = f.attrs.get("layers")
        if recorded is not None and np.atleast_1d(recorded).tolist() != list(layers):
            return f"layers are {np.atleast_1d(recorded).tolist()}, the run's {list(layers)}"
    if width is not None and stored.shape[-1] != width:
        return f"embedding width is {stored.shape[-1]}, the run's {width}"
    if dtype is not None and stored.dtype != np.dtype(dtype):
        return f"dtype is {stored.dtype}, the run's {np.dtype(dtype)}"
    return None


def check_target(path: Path, kind: str, *, overwrite: bool) -> None:
    """Refuse an output path that the run must not write; call it before any work.

    Parameters
    ----------
    path
        Where the output will be renamed into place.
    kind
        ``"output"`` (the HDF5 file) or ``"zarr store"``.
    overwrite
        Whether an existing file, or a Zarr store this tool made, may be replaced.

    Raises
    ------
    VirnucError
        For a symbolic link (replacing it by a rename would replace the link, not the file it
        points to); for an existing output without ``overwrite``; for an output path that is a
        folder or not a regular file; for a Zarr path that exists but is not a store this tool
        made (no ownership marker), whatever ``overwrite`` says: it is never touched.
    """
    if kind not in (OUTPUT, ZARR_STORE):
        raise ValueError(f"unknown kind of output {kind!r}")
    path = Path(path)
    if path.is_symlink():
        raise VirnucError(
            f"{kind} {path} is a symbolic link; give the path it points to (or another path): "
            "the tool replaces outputs by renaming, which would replace the link, not its target"
        )
    if not path.exists():
        return
    if kind == OUTPUT:
        if path.is_dir():
            raise VirnucError(f"output {path} is a directory; give a file name such as out.h5")
        if not path.is_file():
            raise VirnucError(f"output {path} is not a regular file; give a file name")
        if not overwrite:
            raise VirnucError(
                f"output {path} already exists; pass {option('overwrite')} to replace it (the "
                "old file stays intact until the new one is complete)"
            )
        return
    ownership.require_owned(
        path,
        ZARR_STORE,
        hint=f"Give another path: {option('overwrite')} never replaces it.",
    )
    if not overwrite:
        raise VirnucError(
            f"Zarr store {path} already exists; pass {option('overwrite')} to replace it (the "
            "old store stays intact until the new one is complete)"
        )


def remove_stale_partials(path: Path) -> list[Path]:
    """Remove the partial files and stores a killed assembly left beside ``path``.

    Only names of exactly the form ``.NAME.<32 hex digits>.partial`` for this output's
    ``NAME`` are considered; of those, regular files are removed, and folders only when they
    carry the tool's Zarr store marker. Call it while holding the output's lock: a running
    assembly's partial files have the same form.

    Parameters
    ----------
    path
        The output file or Zarr store.

    Returns
    -------
    list of Path
        What was removed.
    """
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[0-9a-f]{{32}}\.partial")
    try:
        entries = sorted(path.parent.iterdir())
    except FileNotFoundError:
        return []
    removed = []
    for entry in entries:
        if not pattern.fullmatch(entry.name) or entry.is_symlink():
            continue
        if entry.is_dir():
            found = ownership.marker(entry)
            if found is None or found.get("kind") != ZARR_STORE:
                logger.warning("leaving %s: it looks partial but is not marked as ours", entry)
                continue
            ownership.remove(entry, ZARR_STORE)
        elif entry.is_file():
            entry.unlink()
        else:
            continue
        logger.info("removed %s, left by an interrupted assembly", entry)
        removed.append(entry)
    return removed


class OutputWriter:
    """Builds the final file while chunks finish: create, add shards in any order, close.

    At construction the file's whole netCDF-4 layout is written under a hidden partial name
    beside the output (ids, lengths, ``truncated``, the ``layer`` coordinate, attributes), with
    the ``embedding`` variable allocated, contiguous, at a fixed place in the file. Its blocks
    are reserved and memory-mapped, and :meth:`add` copies each shard's rows straight there: no
    staging array, no second copy of the values. :meth:`close` checks that every row arrived
    exactly once, writes the Zarr store if asked, and renames into place. So the work left after
    the last chunk is that check and the renames, whatever the size of the output.

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
        Also write the same content as a Zarr v3 store here, at :meth:`close`.
    overwrite
        Replace an existing output file or Zarr store (one this tool made), once the new one is
        complete. Checked here, before any work, and again just before the rename.
    variables
        More variables along ``sequence``, by name (the reads' provenance): numbers, fixed-width
        bytes (``S``, stored as UTF-8 text) or strings (object arrays, variable-length UTF-8).

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
        self._values: np.memmap | None = None
        self._partial = _partial_name(self._output)
        self._state = "open"
        shape = (len(ids), len(self._layers), self._width)
        # The values, the ids, and HDF5's metadata and per-row variables.
        values = int(np.prod(shape)) * self._dtype.itemsize
        self._needed = values + sum(len(i) for i in ids) + 32 * len(ids)
        self._needed += sum(_variable_bytes(v) for v in self._variables.values())
        try:
            with _reporting_disk_full(self._output, "the output file", self._needed):
                offset = _create_layout(
                    self._partial,
                    ids=ids,
                    lengths=lengths,
                    max_residues=max_residues,
                    layers=self._layers,
                    width=self._width,
                    dtype=self._dtype,
                    attrs=self._attrs,
                    variables=self._variables,
                )
                self._values = _map_reserved(self._partial, offset, shape, self._dtype)
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

    def add(self, shard: ShardInfo) -> None:
        """Validate a shard and write its rows into the file now.

        Nothing of a refused shard is written, and the writer stays usable: its rows still
        count as missing at :meth:`close`.

        Parameters
        ----------
        shard
            A finished chunk's shard, in any order relative to the others.

        Raises
        ------
        ShardMismatch
            The shard belongs to another run, layer set, width or dtype.
        RuntimeError
            The shard is misaligned: its ids are not the ids the index expects at its rows.
        """
        self._require_open()
        with h5py.File(shard.path, "r") as f:
            problem = _mismatch(
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
        if self._values is not None:
            self._values[rows] = embedding
        # add.at counts a row listed twice in one shard twice; ``seen[rows] += 1`` would not.
        np.add.at(self._seen, rows, 1)

    def close(self, extra_attrs: dict | None = None) -> str:
        """Check that every row arrived exactly once, finish the outputs and rename them.

        The Zarr store, when asked, is written here from the finished HDF5 file. Whatever
        fails, the partial files are removed (the writer is aborted) and no output appears.

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
                with _reporting_disk_full(self._output, "the output file", needed):
                    _add_attributes(self._partial, extra_attrs)
                step("attributes")
            written = [(self._partial, self._output, OUTPUT)]
            with contextlib.ExitStack() as partials:
                if self._zarr is not None:
                    with _reporting_disk_full(self._zarr, "the Zarr store", self._needed):
                        store = partials.enter_context(_partial(self._zarr, ZARR_STORE, attrs))
                        _hdf5_to_zarr(self._partial, store, self._ids, attrs, self._variables)
                    written.append((store, self._zarr, ZARR_STORE))
                    step("zarr")
                _commit(written, overwrite=self._overwrite)
                step("rename")
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
        _discard(self._partial)

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


def assemble(
    shards: list[ShardInfo],
    *,
    ids: list[str],
    lengths: np.ndarray,
    max_residues: int,
    layers: list[int],
    output: str | Path,
    staging: str | Path | None,
    attrs: dict,
    dtype: str = "float32",
    zarr_path: str | Path | None = None,
    fingerprint: str | None = None,
    width: int | None = None,
    overwrite: bool = False,
    variables: dict[str, np.ndarray] | None = None,
) -> str:
    """Assemble finished shards into the final file at once: :class:`OutputWriter` in one call.

    The reduction of the Dask graph, for callers that have every shard at hand; the pipeline
    feeds an :class:`OutputWriter` while chunks finish instead.

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
    staging
        Unused: the values are written into the output file directly, nothing is staged.
        Kept for callers that pass a staging folder.
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
    ) as writer:
        for shard in shards:
            writer.add(shard)
        return writer.close()


def _create_layout(
    path: Path,
    *,
    ids: list[str],
    lengths: np.ndarray,
    max_residues: int,
    layers: list[int],
    width: int,
    dtype: np.dtype,
    attrs: dict,
    variables: dict[str, np.ndarray] | None = None,
) -> int | None:
    """Write the file's netCDF-4 layout, all but the embedding values; return their offset.

    Written through h5netcdf, as xarray writes it (the ids a variable-length UTF-8 dimension
    scale, ``truncated`` as int8 marked ``dtype="bool"``, a NaN ``_FillValue`` on the values),
    so that xarray opens it without warnings. Returns None when the values take no bytes.
    """
    import h5netcdf

    single = len(layers) == 1
    dimensions = {"sequence": len(ids)}
    if not single:
        dimensions["layer"] = len(layers)
    dimensions["feature"] = width
    # Contiguous and allocated now: the values get one fixed place in the file, which the
    # shards are copied into through a memory map. Never filled: HDF5 would otherwise write
    # the whole variable with NaN first, and close() refuses a file with rows left unwritten.
    create = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    create.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    try:
        with h5netcdf.File(path, "w") as f:
            f.dimensions = dimensions
            f.create_variable(
                "sequence",
                ("sequence",),
                dtype=h5py.string_dtype(),
                data=np.array(ids, dtype=object),
            )
            if not single:
                f.create_variable("layer", ("layer",), data=np.array(layers, dtype=np.int32))
            f.create_variable("length", ("sequence",), data=lengths.astype(np.int64))
            truncated = f.create_variable(
                "truncated", ("sequence",), data=(lengths > max_residues).astype(np.int8)
            )
            truncated.attrs["dtype"] = "bool"
            for name, values in (variables or {}).items():
                _create_sequence_variable(f, name, values)
            values = f.create_variable(
                "embedding",
                tuple(dimensions),
                dtype=dtype,
                fillvalue=np.array(np.nan, dtype=dtype),
                chunks=None,
                dcpl=create,
                fill_time="never",
            )
            if variables:
                # Coordinates of the embedding (CF), as xarray writes non-index coordinates:
                # then `ds.embedding.groupby("read")` works, not only `ds.groupby("read")`.
                values.attrs["coordinates"] = " ".join(variables)
            f.attrs.update(attrs)
    except BaseException as error:
        _close_half_closed(error, path)
        raise
    with h5py.File(path, "r") as f:
        values = f["embedding"]
        if values.size == 0:
            return None  # h5netcdf chunks an empty variable; there is nothing to map anyway
        if values.chunks is not None or values.dtype != dtype:
            raise RuntimeError(f"{path}: embedding is not a contiguous {dtype} variable")
        return values.id.get_offset()


def _create_sequence_variable(f, name: str, values: np.ndarray) -> None:
    """One more variable along ``sequence``, written as xarray writes its kind of values."""
    values = np.asarray(values)
    if values.dtype == object:
        f.create_variable(name, ("sequence",), dtype=h5py.string_dtype(), data=values)
    elif values.dtype.kind == "S":
        # Fixed-width text (frame names, strands): xarray decodes it to str by this attribute.
        variable = f.create_variable(name, ("sequence",), data=values)
        variable.attrs["_Encoding"] = "utf-8"
    else:
        f.create_variable(name, ("sequence",), data=values)


def _variable_bytes(values: np.ndarray) -> int:
    """About the bytes a variable along ``sequence`` takes in the file."""
    values = np.asarray(values)
    if values.dtype == object:
        return sum(len(v) for v in values) + 16 * len(values)
    return values.nbytes


def _map_reserved(
    path: Path, offset: int | None, shape: tuple[int, ...], dtype: np.dtype
) -> np.memmap | None:
    """Reserve the embedding's bytes of the file at ``path`` and memory-map them for writing."""
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if nbytes == 0:
        return None
    # Reserve the blocks first, so that a full disk is ENOSPC here and not a SIGBUS later (a
    # write to a mapped page that the disk has no room for kills the process).
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), offset, nbytes)
        except OSError as error:
            if error.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            logger.warning("cannot reserve space for %s (%s): writing it unreserved", path, error)
    return np.memmap(path, dtype=dtype, mode="r+", offset=offset, shape=shape)


def _add_attributes(path: Path, attrs: dict) -> None:
    """Set attributes of the finished file at ``path``, as xarray would have written them."""
    import h5netcdf

    try:
        with h5netcdf.File(path, "r+") as f:
            f.attrs.update(attrs)
    except BaseException as error:
        _close_half_closed(error, path)
        raise


def _hdf5_to_zarr(
    hdf5: Path,
    store: Path,
    ids: list[str],
    attrs: dict,
    variables: dict[str, np.ndarray] | None = None,
) -> None:
    """Write the finished HDF5 file's content as a Zarr store, chunked by rows."""
    import xarray as xr

    rows = max(1, min(ROWS_PER_CHUNK, len(ids)))
    variables = variables or {}
    with xr.open_dataset(
        hdf5,
        engine="h5netcdf",
        drop_variables=["sequence", *variables],
        chunks={"sequence": rows},
    ) as source:
        # Object ids: xarray's decoding would make them as wide as the longest id on every row.
        dataset = source.assign_coords(sequence=np.array(ids, dtype=object))
        # Encoded as a fresh dataset would be, not as the HDF5 file (contiguous, its source).
        for variable in dataset.variables.values():
            variable.encoding = {}
        dataset.attrs = dict(attrs)
        # The reads' provenance from memory (small), text as str: as the HDF5 file decodes.
        coords = {
            name: ("sequence", _as_text(values) if values.dtype.kind == "S" else values)
            for name, values in ((k, np.asarray(v)) for k, v in variables.items())
        }
        _to_zarr(dataset, store, coords)


def _as_text(values: np.ndarray) -> np.ndarray:
    return np.array([v.decode() for v in values.tolist()], dtype=object)


def _to_zarr(dataset, path: Path, coords: dict | None = None) -> None:
    import dask

    rows = min(ROWS_PER_CHUNK, dataset.sizes["sequence"])
    with dask.config.set(scheduler="synchronous"), warnings.catch_warnings():
        # Variable-length strings and consolidated metadata are not yet in the Zarr v3 core
        # specification, and the store's ownership marker is no Zarr node: zarr-python warns
        # about each while writing. xarray and zarr-python read them back fine.
        warnings.filterwarnings("ignore", message=".*not part of the Zarr format 3")
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        warnings.filterwarnings("ignore", message=_MARKER_WARNING)
        # Mode "a": the folder exists already, holding only the ownership marker, which "w"
        # would delete and "w-" refuses. Consolidated: readers then take the list of arrays
        # from zarr.json instead of listing the folder, so they neither warn about the marker
        # nor (xarray's default) about a store without consolidated metadata. Coordinates
        # given in memory are added after chunking: a dask array of strings would be computed
        # once to find its type, with a warning.
        chunked = dataset.chunk({"sequence": rows}).assign_coords(coords or {})
        chunked.to_zarr(path, zarr_format=3, mode="a", consolidated=True)


def _close_half_closed(error: BaseException, path: Path) -> None:
    """Finish closing the file at ``path`` that a failed netCDF write left half-closed.

    When HDF5 fails to close a file (a full disk fails its last flush), h5netcdf does not mark
    it closed and closes it again when ``error``'s traceback is collected: h5py then reads the
    half-closed file and the process dies of a segmentation fault. The file is our partial,
    removed anyway: emptying it frees the space the last flush needs, so it closes cleanly.
    """
    h5netcdf = sys.modules.get("h5netcdf")
    if h5netcdf is None:
        return
    for frame in _frames(error):
        for value in list(frame.f_locals.values()):
            if not isinstance(value, h5netcdf.File) or value._closed is not False:
                continue
            # h5netcdf's copy of the name: h5py's own reads the half-closed file.
            if os.path.abspath(value._filename) != os.path.abspath(path):
                continue
            h5file = value._h5file
            value._closed = True
            with contextlib.suppress(OSError):
                os.truncate(path, 0)
            with contextlib.suppress(Exception):
                h5file.close()


def _frames(error: BaseException) -> Iterator:
    """Every frame of ``error``'s traceback and of the exceptions it was raised from."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        tb = error.__traceback__
        while tb is not None:
            yield tb.tb_frame
            tb = tb.tb_next
        error = error.__cause__ or error.__context__


def _out_of_space(error: BaseException) -> bool:
    """Whether ``error``, or one it was raised from, is a lack of disk space or quota."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _OUT_OF_SPACE:
            return True
        if _HDF5_OUT_OF_SPACE.search(str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def _reporting_disk_full(path: Path, what: str, needed: int) -> Iterator[None]:
    """Turn a lack of space while writing ``what`` at ``path`` into :class:`DiskFull`."""
    try:
        yield
    except Exception as error:
        if not _out_of_space(error):
            raise
        raise DiskFull(
            f"no space left for {what} at {path}: it needs about {_size(needed)} of free space "
            "on that disk. The partial files were removed and the finished shards are kept: "
            f"free some space and run again with {option('resume')} to assemble them without "
            "recomputing"
        ) from error


def _size(nbytes: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if nbytes < 1000:
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} TB"


def _partial_name(target: Path) -> Path:
    """The hidden sibling a file or store is written to before its rename."""
    return target.with_name(f".{target.name}.{uuid.uuid4().hex}.partial")


@contextlib.contextmanager
def _partial(target: Path, kind: str, attrs: dict) -> Iterator[Path]:
    """A fresh partial sibling of ``target``, removed on exit unless it was renamed away.

    A Zarr one is created and marked at once, so that it is never an unmarked folder that
    :func:`remove_stale_partials` or this cleanup would have to leave behind.
    """
    partial = _partial_name(target)
    try:
        if kind == ZARR_STORE:
            ownership.claim(partial, ZARR_STORE, attrs.get("fingerprint"))
        yield partial
    finally:
        _discard(partial)


def _discard(partial: Path) -> None:
    """Remove a partial file, or a partial store that carries the marker (and nothing else)."""
    if partial.is_dir() and not partial.is_symlink():
        found = ownership.marker(partial)
        if found is not None and found.get("kind") == ZARR_STORE:
            ownership.remove(partial, ZARR_STORE)
        else:
            logger.warning("leaving %s: it is not marked as a store this tool made", partial)
    else:
        partial.unlink(missing_ok=True)


def _commit(written: list[tuple[Path, Path, str]], *, overwrite: bool) -> None:
    """Rename every complete partial into place, after checking every target once more."""
    # Someone may have created an output while the run was computing: check both before
    # renaming either, so that both outputs appear or neither does.
    for _, target, kind in written:
        try:
            check_target(target, kind, overwrite=overwrite)
        except VirnucError as error:
            raise VirnucError(f"{error}. {_appeared(target)}") from None
    for partial, target, kind in written:
        if kind == OUTPUT:
            _rename_file(partial, target, overwrite=overwrite)
        else:
            _rename_store(partial, target)


def _appeared(target: Path) -> str:
    return (
        f"{target} appeared while the run was computing; the finished shards are kept: run "
        f"again with {option('resume')} (and {option('overwrite')} to replace it)"
    )


def _rename_file(partial: Path, target: Path, *, overwrite: bool) -> None:
    if overwrite:
        # Freeing a replaced file of gigabytes takes the kernel a second or more: the old file
        # stays open until the rename is done and is closed (freed) in the background.
        try:
            replaced = open(target, "rb")  # noqa: SIM115 (closed by _close_later)
        except OSError:
            replaced = None
        os.replace(partial, target)
        if replaced is not None:
            _close_later(replaced)
        return
    # A hard link creates the name only if it is free: no file created since the check is
    # ever replaced. Where the filesystem has no hard links, the check just made stands.
    try:
        os.link(partial, target)
    except FileExistsError:
        raise VirnucError(
            f"output {target} already exists; pass {option('overwrite')} to replace it. "
            f"{_appeared(target)}"
        ) from None
    except OSError as error:
        if error.errno not in _NO_HARD_LINKS:
            raise
        os.replace(partial, target)
    else:
        partial.unlink()


def _close_later(file) -> None:
    """Close ``file`` in a background thread (at the latest, the process's exit closes it)."""
    threading.Thread(target=file.close, name="virnuc-dask-free-replaced", daemon=True).start()


def _rename_store(partial: Path, target: Path) -> None:
    if not target.exists():
        try:
            os.rename(partial, target)
        except OSError as error:
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            raise VirnucError(f"Zarr store {target} exists. {_appeared(target)}") from None
        return
    # The old store is ours and may be replaced (checked just before): move it aside, move
    # the new one in, and only then remove the old one.
    aside = _partial_name(target)
    os.rename(target, aside)
    try:
        os.rename(partial, target)
    except BaseException:
        os.rename(aside, target)
        raise
    ownership.remove(aside, ZARR_STORE)


def open_embeddings(path: str | Path, chunks: dict | str | None = None):
    """Open an embedding file (HDF5 or Zarr) as an ``xarray.Dataset``.

    Parameters
    ----------
    path
        An HDF5 file written by :func:`virnuc_dask.embed`, or its ``--zarr`` store.
    chunks
        Dask chunks for the variables (``{"sequence": 100_000}``, ``"auto"``): the values
        become dask arrays, read block by block when computed, for files larger than memory.
        Default: xarray's lazy arrays, read whole on first use (a Zarr store is always
        opened with dask, in its own blocks).

    Returns
    -------
    xarray.Dataset
        With ``embedding``, ``length`` and ``truncated`` indexed by ``sequence`` (the ids, an
        object array of ``str``: xarray's own decoding makes a fixed-width array as wide as
        the longest id), lazily loaded. A run on reads adds ``read`` (also an object array of
        ``str``), ``frame``, ``strand``, ``nt_start``, ``nt_end`` (and ``piece``, ...), so
        that ``ds.groupby("read")`` gathers each read's peptides.
    """
    import xarray as xr

    path = Path(path)
    if not path.exists():
        raise VirnucError(f"no embedding file at {path}")
    if path.is_dir():
        with warnings.catch_warnings():
            # Stores of earlier versions, without consolidated metadata, are listed.
            warnings.filterwarnings("ignore", message=_MARKER_WARNING)
            given = {} if chunks is None else {"chunks": chunks}
            dataset = xr.open_zarr(path, drop_variables=list(_STRINGS), **given)
        strings = _zarr_strings(path)
    else:
        dataset = xr.open_dataset(
            path, engine="h5netcdf", drop_variables=list(_STRINGS), chunks=chunks
        )
        strings = _hdf5_strings(path)
    if chunks is not None or path.is_dir():
        # One value per sequence (lengths, flags, read provenance) is small: in memory, so it
        # can label groups (xarray cannot group by a dask array without being told the labels).
        small = [n for n, v in dataset.variables.items() if v.dims == ("sequence",)]
        dataset = dataset.assign({n: dataset[n].load() for n in small if n in dataset.data_vars})
        dataset = dataset.assign_coords(
            {n: dataset[n].load() for n in small if n in dataset.coords}
        )
    if "sequence" in strings:
        dataset = dataset.assign_coords(sequence=strings.pop("sequence"))
    return dataset.assign_coords({name: ("sequence", values) for name, values in strings.items()})


#: Variables of variable-length strings, read as object arrays of ``str``.
_STRINGS = ("sequence", "read")


def _hdf5_strings(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {name: f[name].asstr()[:] for name in _STRINGS if name in f}


def _zarr_strings(path: Path) -> dict[str, np.ndarray]:
    import zarr

    # zarr returns numpy's variable-width StringDType; xarray and pandas index objects.
    return {
        name: zarr.open_array(path, path=name, mode="r")[:].astype(object)
        for name in _STRINGS
        if (path / name).is_dir()
    }
