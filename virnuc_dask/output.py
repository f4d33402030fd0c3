"""Output: the one module that owns files on disk: shards, the final HDF5, and Zarr.

A *shard* is one chunk's result, an HDF5 file written to a temporary name and renamed, so a
retried or resumed task never leaves half a shard. It holds the input rows it covers, their ids
(as read by the worker, so that assembly can prove the alignment), the pooled embeddings, and
what they are: the run's fingerprint, the pooled layers and the width.

The *final file* is assembled in one pass by one writer (h5py objects cannot cross processes):
shards are scattered into a staged memory-mapped array in input order, every row is checked to
be present exactly once with the id the index expects, and xarray writes the netCDF-4/HDF5 file
through h5netcdf to a temporary name, renamed when complete. Layout (``docs/output.md``):

- ``embedding`` (``sequence``, ``feature``) or (``sequence``, ``layer``, ``feature``), float32
  or float16, chunked by rows;
- ``sequence``: the ids, variable-length UTF-8, a dimension scale (``ds.sel(sequence=ID)``);
- ``length`` (residues before truncation), ``truncated`` (bool);
- attributes: model, layers, pooling, compute dtype, weights source, versions, inputs, time.

Decisions:

- A shard of another run (fingerprint), another layer set, width or dtype is refused
  (:class:`ShardMismatch`), never cast or broadcast into the output: a width-1 shard would
  otherwise fill every feature of its rows with one number.
- The staging array has a fresh name per attempt and is removed when the attempt ends, so two
  attempts of one assembly (a retried task whose first worker still runs) never truncate each
  other's memory map. Its blocks are reserved (``posix_fallocate``) before it is mapped: a
  write to a mapped page that the disk has no room for is a SIGBUS that kills the worker, while
  the reservation fails with ENOSPC, which becomes :class:`DiskFull`, like ENOSPC or EDQUOT
  anywhere in the netCDF or Zarr writing. Partial files are removed; the shards stay.
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


def assemble(
    shards: list[ShardInfo],
    *,
    ids: list[str],
    lengths: np.ndarray,
    max_residues: int,
    layers: list[int],
    output: str | Path,
    staging: str | Path,
    attrs: dict,
    dtype: str = "float32",
    zarr_path: str | Path | None = None,
    fingerprint: str | None = None,
    width: int | None = None,
    overwrite: bool = False,
) -> str:
    """Assemble shards into the final file in input order, validate it, and rename it in place.

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
        Folder for the memory-mapped staging array (one per attempt, removed at the end).
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
        width of the first.
    overwrite
        Replace an existing output file or Zarr store (one this tool made), once the new one
        is complete. Checked before any work and again just before the rename.

    Returns
    -------
    str
        The output path.

    Raises
    ------
    ShardMismatch
        A shard belongs to another run, layer set, width or dtype.
    DiskFull
        The disk of the staging folder or of an output ran out of space.
    VirnucError
        An output exists (without ``overwrite``) or may not be replaced (:func:`check_target`).
    """
    output = Path(output)
    targets = [(output, OUTPUT)]
    if zarr_path is not None:
        targets.append((Path(zarr_path), ZARR_STORE))
    for target, kind in targets:
        check_target(target, kind, overwrite=overwrite)
    staged_path = Path(staging) / f"embedding-{uuid.uuid4().hex}.npy"
    try:
        staged, seen = _scatter(
            shards,
            ids,
            staged_path,
            layers=layers,
            width=width,
            dtype=dtype,
            fingerprint=fingerprint,
        )
        missing = np.flatnonzero(seen == 0)
        doubled = np.flatnonzero(seen > 1)
        if len(missing) or len(doubled):
            raise RuntimeError(
                f"assembly found {len(missing)} sequences missing and {len(doubled)} embedded "
                f"more than once (first missing: {[ids[i] for i in missing[:3]]}, first "
                f"doubled: {[ids[i] for i in doubled[:3]]})"
            )
        dataset = _dataset(staged, ids, np.asarray(lengths), max_residues, layers, attrs)
        needed = staged.nbytes + sum(len(i) for i in ids) + 32 * len(ids)
        writers = {OUTPUT: _to_netcdf, ZARR_STORE: _to_zarr}
        with contextlib.ExitStack() as partials:
            written = []
            for target, kind in targets:
                what = "the output file" if kind == OUTPUT else "the Zarr store"
                with _reporting_disk_full(target, what, needed):
                    partial = partials.enter_context(_partial(target, kind, attrs))
                    writers[kind](dataset, partial)
                written.append((partial, target, kind))
            _commit(written, overwrite=overwrite)
    finally:
        staged_path.unlink(missing_ok=True)
    return str(output)


def _scatter(
    shards: list[ShardInfo],
    ids: list[str],
    staged_path: Path,
    *,
    layers: list[int],
    width: int | None,
    dtype: str,
    fingerprint: str | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Copy every shard's rows into a staged array in input order; count each row's copies."""
    seen = np.zeros(len(ids), dtype=np.int32)
    staged = None
    for shard in sorted(shards, key=lambda s: s.chunk):
        with h5py.File(shard.path, "r") as f:
            problem = _mismatch(f, fingerprint=fingerprint, layers=layers, width=width, dtype=dtype)
            if problem:
                raise ShardMismatch(
                    f"shard {shard.path} does not belong to this run: its {problem}. Nothing "
                    "was written and the run's shards are kept; running again with "
                    f"{option('resume')} recomputes the shards that do not match"
                )
            rows = f["rows"][:]
            shard_ids = f["ids"].asstr()[:]
            embedding = f["embedding"][:]
        # Without a width from the caller, the first shard sets it for the others.
        width = embedding.shape[2] if width is None else width
        expected = [ids[r] for r in rows]
        if list(shard_ids) != expected:
            bad = next(
                i for i, (a, b) in enumerate(zip(shard_ids, expected, strict=True)) if a != b
            )
            raise RuntimeError(
                f"shard {shard.path} is misaligned: row {rows[bad]} holds {shard_ids[bad]!r}, "
                f"the index says {expected[bad]!r}"
            )
        if staged is None:
            shape = (len(ids), len(layers), width)
            needed = int(np.prod(shape)) * np.dtype(dtype).itemsize
            with _reporting_disk_full(staged_path, "the assembly's staging array", needed):
                staged = _staging_array(staged_path, shape, dtype)
        staged[rows] = embedding
        seen[rows] += 1
    if staged is None:
        raise RuntimeError("no shards to assemble")
    return staged, seen


def _staging_array(path: Path, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """A new ``.npy`` file at ``path`` with every block reserved, memory-mapped for writing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Create the file and its header, unmapped at once (the map is not kept) ...
    np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    # ... reserve its blocks, so that a full disk is ENOSPC here and not a SIGBUS later ...
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as error:
            if error.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            logger.warning("cannot reserve space for %s (%s): writing it unreserved", path, error)
    # ... and map it only now.
    return np.lib.format.open_memmap(path, mode="r+")


def _dataset(staged, ids, lengths, max_residues, layers, attrs):
    import dask.array as da
    import xarray as xr

    single = len(layers) == 1
    values = da.from_array(staged, chunks=(ROWS_PER_CHUNK,) + staged.shape[1:])
    if single:
        values = values[:, 0, :]
    dims = ("sequence", "feature") if single else ("sequence", "layer", "feature")
    # Object dtype: a numpy string array would be as wide as the longest id on every row.
    coords = {"sequence": np.array(ids, dtype=object)}
    if not single:
        coords["layer"] = np.array(layers, dtype=np.int32)
    return xr.Dataset(
        {
            "embedding": (dims, values),
            "length": ("sequence", lengths.astype(np.int64)),
            "truncated": ("sequence", lengths > max_residues),
        },
        coords=coords,
        attrs=attrs,
    )


def _to_netcdf(dataset, path: Path) -> None:
    import dask

    chunks = (ROWS_PER_CHUNK,) + dataset["embedding"].shape[1:]
    chunks = tuple(min(c, s) for c, s in zip(chunks, dataset["embedding"].shape, strict=True))
    encoding = {"embedding": {"chunksizes": chunks}, "sequence": {"dtype": str}}
    try:
        # This runs inside a Dask task: write with the local synchronous scheduler, not the
        # cluster, so the staged array is streamed to the file block by block.
        with dask.config.set(scheduler="synchronous"):
            dataset.to_netcdf(path, engine="h5netcdf", encoding=encoding)
    except BaseException as error:
        _close_half_closed(error, path)
        raise


def _to_zarr(dataset, path: Path) -> None:
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
        # nor (xarray's default) about a store without consolidated metadata.
        dataset.chunk({"sequence": rows}).to_zarr(path, zarr_format=3, mode="a", consolidated=True)


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
        os.replace(partial, target)
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


def open_embeddings(path: str | Path):
    """Open an embedding file (HDF5 or Zarr) as an ``xarray.Dataset``.

    Parameters
    ----------
    path
        An HDF5 file written by :func:`virnuc_dask.embed`, or its ``--zarr`` store.

    Returns
    -------
    xarray.Dataset
        With ``embedding``, ``length`` and ``truncated`` indexed by ``sequence`` (the ids, an
        object array of ``str``: xarray's own decoding makes a fixed-width array as wide as
        the longest id), lazily loaded.
    """
    import xarray as xr

    path = Path(path)
    if not path.exists():
        raise VirnucError(f"no embedding file at {path}")
    if path.is_dir():
        with warnings.catch_warnings():
            # Stores of earlier versions, without consolidated metadata, are listed.
            warnings.filterwarnings("ignore", message=_MARKER_WARNING)
            dataset = xr.open_zarr(path, drop_variables=["sequence"])
        ids = _zarr_ids(path)
    else:
        dataset = xr.open_dataset(path, engine="h5netcdf", drop_variables=["sequence"])
        ids = _hdf5_ids(path)
    return dataset if ids is None else dataset.assign_coords(sequence=ids)


def _hdf5_ids(path: Path) -> np.ndarray | None:
    with h5py.File(path, "r") as f:
        return f["sequence"].asstr()[:] if "sequence" in f else None


def _zarr_ids(path: Path) -> np.ndarray | None:
    import zarr

    if not (path / "sequence").is_dir():
        return None
    # zarr returns numpy's variable-width StringDType; xarray and pandas index objects.
    return zarr.open_array(path, path="sequence", mode="r")[:].astype(object)
