"""Per-residue output: where each sequence's residues go, and how they stream there.

With ``per_residue=True`` the output holds ``residue_embedding`` (``residue``, [``layer``,]
``feature``) and ``residue_start`` along ``sequence``: the residues of sequence ``i`` are rows
``residue_start[i]`` to ``residue_start[i] + n_i``, ``n_i`` the residues embedded (BOS and EOS
excluded; the first ``max_residues`` of a truncated sequence, all of a windowed one).

Decisions:

- **One region per chunk, known up front.** The rows of a chunk's sequences form one region,
  in the chunk's order; the regions follow each other in chunk order, each starting at a
  multiple of :data:`RESIDUES_PER_CHUNK` (the HDF5 and Zarr chunk of the variable). So the
  layout, ``residue_start`` included, follows from the lengths and the partition alone, before
  anything is computed, and no storage chunk is shared by two regions: a worker's shard holds
  its region's chunks exactly, and two writers (or two workers writing a Zarr store) never
  touch the same chunk. The price is a gap of fewer than 1,024 rows after each region, which
  is never written (no disk used; it reads as NaN, and xarray's reductions skip NaN).
  ``residue_start`` is an index: rows are not in sequence order.
- **Compressed once, by the workers; copied by the writer, into both outputs.** A shard
  stores its residues with the final variable's chunk shape, dtype and encoding. The single
  writer copies each chunk's compressed bytes into the file (HDF5's direct chunk write) and,
  with a Zarr store, the same bytes under the chunk's key in the store, as the shard arrives
  and without decoding them: its work is I/O only, one chunk in memory at a time, the
  compression runs in parallel on the workers, and nothing of the residues is left to do
  after the last chunk. (Copying the store from the finished file, decoding and compressing
  again on one core, took 6.0 s per 0.5 GB of rows on a 2-core machine: minutes for a 3B
  run's 69 GB, while the GPUs idle.)
- **One encoding that both formats name: Blosc (Zstandard level 1 inside, byte shuffle, one
  block per chunk).** It is HDF5 filter 32001 and a codec of the Zarr v3 core specification
  (``blosc``), so the store needs no extension codec: a byte shuffle and Zstandard as two
  steps is ``numcodecs.shuffle`` in Zarr v3, which zarr-python warns about on every open and
  other implementations cannot read. One Blosc block per chunk gives the ratio of the
  two-step encoding (0.846 of the raw bytes for both in ``benchmarks/residue_compression.py``;
  0.824 for both on ESM-2 8M rows, where Blosc's default blocks of 64 kB gave 0.918) and
  compresses a little faster (1,388 against 1,180 MB/s on one core of the 2-core machine,
  1,024 x 2,560 float16, the shuffle included). The bytes are exactly what zarr-python's own
  codec writes for the chunk. The filter is registered by ``hdf5plugin`` (a dependency, imported
  by this package and by :func:`~virnuc_dask.open_embeddings`); other readers load it the
  same way (``import hdf5plugin`` before h5py or xarray opens the file, or
  ``HDF5_PLUGIN_PATH`` for netCDF-C).
- **Zstandard, not deflate.** ESM-2 3B on one H200 produces about 500 MB of float16 rows a
  second; deflate (level 1, after the shuffle) compressed them at 34 MB/s per core on the GPU
  machine, 369 MB/s with 16 threads, and the run with it embedded at 38% of the pooled-only
  rate. Zstandard level 1 runs at hundreds of MB/s per core for about the same ratio.
- **Nothing holds the array.** The engines hand over rows batch by batch; the worker writes
  them into its shard as they come (an HDF5 chunk cache of a few chunks absorbs the batches'
  edges); the writer streams chunk by chunk into the file and the store.
- **float16 by default** (``residue_dtype``): half the bytes of float32 for values that are
  compared at float16's precision anyway (bf16 compute has fewer mantissa bits); float32 on
  request.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np

from virnuc_dask.cluster.hardware import usable_cpus

#: Rows of one storage chunk of ``residue_embedding`` (HDF5 and Zarr), and the alignment of
#: each chunk's region: 1,024 rows of ESM-2 3B in float16 are 5 MB.
RESIDUES_PER_CHUNK = 1024
#: Zstandard level of ``residue_embedding`` (1: the fastest; floats gain little from more).
ZSTD_LEVEL = 1
#: HDF5 filter of ``residue_embedding`` in shards and in the output (identical: the writer
#: copies compressed chunks): Blosc (``hdf5plugin``'s filter 32001) with Zstandard inside,
#: after a byte shuffle. The chunks are compressed by :func:`_compress`, not by the filter.
FILTERS = dict(hdf5plugin.Blosc(cname="zstd", clevel=ZSTD_LEVEL, shuffle=hdf5plugin.Blosc.SHUFFLE))
#: The chunks' encoding, in the run's fingerprint: shards of another encoding are recomputed.
ENCODING = f"blosc zstd {ZSTD_LEVEL} shuffle, one block a chunk"
#: The shard dataset of a chunk's residues.
SHARD_DATASET = "residues"


@dataclass(frozen=True)
class ResidueLayout:
    """Where every sequence's residues lie in ``residue_embedding``.

    Attributes
    ----------
    counts
        Residues embedded per sequence, in input order.
    start
        ``residue_start``: the first row of each sequence.
    rows
        Rows of the variable (regions and their gaps).
    dtype
        Storage dtype.
    chunk_rows
        Rows per storage chunk, and the alignment of regions.
    """

    counts: np.ndarray
    start: np.ndarray
    rows: int
    dtype: np.dtype
    chunk_rows: int = RESIDUES_PER_CHUNK

    @classmethod
    def from_partition(
        cls,
        counts: np.ndarray,
        order: np.ndarray,
        bounds: list[tuple[int, int]],
        dtype: str = "float16",
        chunk_rows: int = RESIDUES_PER_CHUNK,
    ) -> ResidueLayout:
        """The layout of a partition: chunk ``k`` covers ``order[bounds[k][0]:bounds[k][1]]``.

        Parameters
        ----------
        counts
            Residues embedded per sequence, in input order.
        order
            The partition's order of input rows.
        bounds
            Each chunk's range of ``order``, in chunk order, covering it once.
        dtype
            Storage dtype.
        chunk_rows
            Rows per storage chunk.
        """
        counts = np.asarray(counts, dtype=np.int64)
        in_order = counts[order]
        before = np.concatenate([[0], np.cumsum(in_order)])  # residues before each position
        begins = np.array([b[0] for b in bounds], dtype=np.int64)
        ends = np.array([b[1] for b in bounds], dtype=np.int64)
        sizes = before[ends] - before[begins]
        padded = -(-sizes // chunk_rows) * chunk_rows
        regions = np.concatenate([[0], np.cumsum(padded)])[:-1]
        start = np.zeros(len(counts), dtype=np.int64)
        chunk_of = np.repeat(np.arange(len(bounds)), ends - begins)
        positions = np.concatenate([np.arange(a, b) for a, b in bounds]) if bounds else []
        positions = np.asarray(positions, dtype=np.int64)
        start[order[positions]] = regions[chunk_of] + before[positions] - before[begins[chunk_of]]
        return cls(counts, start, int(padded.sum()), np.dtype(dtype), chunk_rows)

    def shared(self, sources: np.ndarray) -> ResidueLayout:
        """This layout with every row pointing at its source's rows (no bytes stored twice).

        ``sources``: each row's source row (:mod:`~virnuc_dask.plan.distinct`); the layout
        was made from a partition of the sources only.
        """
        sources = np.asarray(sources, dtype=np.int64)
        return dataclasses.replace(self, start=self.start[sources])

    def region(self, rows: np.ndarray) -> int:
        """The first row of the region of a shard of ``rows``; checks it is the layout's.

        Raises
        ------
        RuntimeError
            The rows' places in the layout are not one region in this order.
        """
        counts = self.counts[rows]
        region = int(self.start[rows[0]]) if len(rows) else 0
        expected = region + np.concatenate([[0], np.cumsum(counts)[:-1]])
        if region % self.chunk_rows or not np.array_equal(self.start[rows], expected):
            raise RuntimeError(
                "the shard's sequences do not form one region of the per-residue layout in "
                "this order (another partition?)"
            )
        return region


def create_variable(f, dims: tuple[str, ...], shape_tail: tuple[int, ...], dtype) -> None:
    """Create ``residue_embedding`` in an open h5netcdf file, chunked and compressed."""
    f.create_variable(
        "residue_embedding",
        dims,
        dtype=dtype,
        chunks=(RESIDUES_PER_CHUNK, *shape_tail),
        fillvalue=np.array(np.nan, dtype=dtype),
        **FILTERS,
    )


class ShardResidues:
    """A chunk's residues, written into its shard as the engine hands them over.

    The shard is created here (under its partial name) with one dataset of all the chunk's
    residues, in the chunk's order, chunked and compressed as the output's variable; the rest
    of the shard is added by :func:`~virnuc_dask.output.shards.write_shard`.

    Rows are gathered into whole storage chunks in memory; a complete chunk is shuffled and
    compressed by a pool of threads (Zstandard releases the GIL) and written as it is (HDF5's
    direct chunk write), so compression never runs in the engine's thread nor on one core:
    ESM-2 3B on an H200 produces about 500 MB of float16 rows a second. The engines hand rows
    over in the chunk's order, so one or two chunks are filling at a time; at most
    ``2 * threads`` compressed chunks wait to be written.

    Parameters
    ----------
    path
        The shard's partial file, created here.
    counts
        Residues of each of the chunk's sequences, in the chunk's order.
    layers, width
        The rows' shape: ``(layers, width)``.
    dtype
        Storage dtype.
    threads
        Compression threads; default: the CPUs this process may use, at most 8.
    """

    def __init__(
        self,
        path: str | Path,
        counts: np.ndarray,
        layers: int,
        width: int,
        dtype: str,
        threads: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.counts = np.asarray(counts, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])
        self.dtype = np.dtype(dtype)
        self._shape = (layers, width)
        self._file = h5py.File(self.path, "w")
        # Whole chunks (the region's gap included), so that each is copied as it is.
        self._used = int(self.offsets[-1])
        rows = -(-self._used // RESIDUES_PER_CHUNK) * RESIDUES_PER_CHUNK
        self._data = self._file.create_dataset(
            SHARD_DATASET,
            shape=(rows, layers, width),
            dtype=self.dtype,
            chunks=(RESIDUES_PER_CHUNK, layers, width) if rows else None,
            fillvalue=np.array(np.nan, dtype=self.dtype),
            **(FILTERS if rows else {}),
        )
        self._file.create_dataset("residue_counts", data=self.counts)
        # Chunk number -> (its rows, NaN where not yet written; rows still to come).
        self._filling: dict[int, tuple[np.ndarray, int]] = {}
        self._threads = threads or min(8, usable_cpus())
        self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="virnuc-dask-compress")
        self._compressing: deque[tuple[int, Future]] = deque()

    def write(self, sequences: np.ndarray, values: np.ndarray, counts: np.ndarray) -> None:
        """Write whole sequences' rows: positions ``sequences`` of the chunk, rows back to back.

        Consecutive sequences that lie next to each other in the shard (the usual case: the
        engines run them in the chunk's order) are copied in one piece.
        """
        sequences = np.asarray(sequences, dtype=np.int64)
        if not np.array_equal(self.counts[sequences], counts):
            raise RuntimeError("per-residue rows do not match their sequences' residue counts")
        starts = self.offsets[sequences]
        ends = starts + counts
        # Runs of sequences whose rows are adjacent in the shard too.
        breaks = np.flatnonzero(starts[1:] != ends[:-1]) + 1
        source = np.concatenate([[0], np.cumsum(counts)])
        for run in np.split(np.arange(len(sequences)), breaks):
            if len(run) == 0:
                continue
            a, b = int(starts[run[0]]), int(ends[run[-1]])
            if b > a:
                self._put(a, values[source[run[0]] : source[run[-1] + 1]])

    def close(self) -> None:
        """Write what remains, flush and close the shard's file (``write_shard`` adds the rest).

        Raises
        ------
        RuntimeError
            Rows of the chunk never arrived.
        """
        if not self._file.id.valid:
            return
        try:
            if self._filling:
                missing = sum(left for _, left in self._filling.values())
                raise RuntimeError(f"{missing} per-residue rows of the chunk never arrived")
            while self._compressing:
                self._write_oldest()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._file.close()

    def discard(self) -> None:
        """Close and remove the partial shard."""
        self._filling.clear()
        self._compressing.clear()
        self.close()
        self.path.unlink(missing_ok=True)

    def _put(self, first: int, rows: np.ndarray) -> None:
        """Copy ``rows`` (shard rows from ``first``) into their chunks; hand on full ones."""
        done = 0
        while done < len(rows):
            number, offset = divmod(first + done, RESIDUES_PER_CHUNK)
            buffer, left = self._filling.get(number) or self._new_chunk(number)
            take = min(len(rows) - done, RESIDUES_PER_CHUNK - offset)
            buffer[offset : offset + take] = rows[done : done + take]
            done += take
            left -= take
            if left:
                self._filling[number] = (buffer, left)
                continue
            self._filling.pop(number, None)
            self._compressing.append((number, self._pool.submit(_compress, buffer)))
            while len(self._compressing) > 2 * self._threads:
                self._write_oldest()

    def _new_chunk(self, number: int) -> tuple[np.ndarray, int]:
        """A chunk's buffer, NaN (the fill value) on the rows past the region's end."""
        buffer = np.empty((RESIDUES_PER_CHUNK, *self._shape), dtype=self.dtype)
        rows = min(RESIDUES_PER_CHUNK, self._used - number * RESIDUES_PER_CHUNK)
        buffer[rows:] = np.nan
        return buffer, rows

    def _write_oldest(self) -> None:
        number, compressed = self._compressing.popleft()
        tail = (0,) * len(self._shape)
        self._data.id.write_direct_chunk((number * RESIDUES_PER_CHUNK, *tail), compressed.result())


def _compress(chunk: np.ndarray) -> bytes:
    """A chunk's bytes as :data:`FILTERS` and :func:`zarr_codec` decode them: one Blosc buffer.

    One block of the whole chunk (Blosc's default splits it into blocks of 64 kB, which
    Zstandard compresses each on its own, worse); the byte shuffle of the element size.
    """
    from numcodecs import Blosc  # here, not at import: the command line's errors stay quick

    codec = Blosc(cname="zstd", clevel=ZSTD_LEVEL, shuffle=Blosc.SHUFFLE, blocksize=chunk.nbytes)
    return bytes(codec.encode(np.ascontiguousarray(chunk)))


def zarr_codec(dtype: np.dtype, chunk_shape: tuple[int, ...]):
    """The Zarr v3 codec whose encoding of a chunk is :func:`_compress`'s, byte for byte."""
    from zarr.codecs import BloscCodec

    dtype = np.dtype(dtype)
    return BloscCodec(
        cname="zstd",
        clevel=ZSTD_LEVEL,
        shuffle="shuffle",
        typesize=dtype.itemsize,
        blocksize=math.prod(chunk_shape) * dtype.itemsize,
    )


def copy_chunks(
    shard: h5py.File,
    target: h5py.Dataset,
    region: int,
    chunk_rows: int,
    also: Callable[[int, bytes], None] | None = None,
) -> int:
    """Copy a shard's compressed residue chunks into ``target`` from row ``region``; bytes.

    The chunks are copied as stored (HDF5's direct chunk read and write): never decoded.
    ``also(first_row, data)``, when given, receives each chunk's bytes too (the Zarr store's
    copy, :class:`~virnuc_dask.output.zarr_store.ResidueChunks`).

    Raises
    ------
    RuntimeError
        A chunk was stored with a filter skipped (its bytes are not the encoding ``also``
        expects): shards never store one so.
    """
    source = shard[SHARD_DATASET]
    tail = (0,) * (target.ndim - 1)
    copied = 0
    for first in range(0, source.shape[0], chunk_rows):
        mask, data = source.id.read_direct_chunk((first, 0, 0))
        if mask and also is not None:
            raise RuntimeError(f"residue chunk at row {first} was stored without its filter")
        target.id.write_direct_chunk((region + first, *tail), data, mask)
        if also is not None:
            also(region + first, data)
        copied += len(data)
    return copied


def same_storage(source: h5py.Dataset, target: h5py.Dataset) -> str | None:
    """Why a shard's residues cannot be copied chunk for chunk into ``target``; None if they can."""
    if source.dtype != target.dtype:
        return f"residue dtype is {source.dtype}, the run's {target.dtype}"
    if source.shape[1] * source.shape[2] != math.prod(target.shape[1:]):
        return f"residue rows are {source.shape[1:]}, the run's {target.shape[1:]}"
    if source.shape[0] and (
        source.chunks[0] != target.chunks[0]
        or source.compression != target.compression
        or source.shuffle != target.shuffle
        or source.compression_opts != target.compression_opts
    ):
        return "residue chunks or filters differ from the run's"
    return None


def residues_of(dataset, id: str):
    """One sequence's per-residue embedding, ``(position, feature)`` (or with ``layer``).

    Parameters
    ----------
    dataset
        An output opened by :func:`~virnuc_dask.output.open_embeddings`, written with
        ``per_residue=True``.
    id
        The sequence's id.

    Returns
    -------
    xarray.DataArray
        Dims ``("position", "feature")`` (``("position", "layer", "feature")`` with several
        layers); ``position`` is the residue's 0-based place in the sequence (windowed
        sequences: all residues; truncated ones: the first ``max_residues``).
    """
    from virnuc_dask.errors import VirnucError

    if "residue_embedding" not in dataset:
        raise VirnucError("this output has no per-residue embeddings: embed with per_residue=True")
    i = int(dataset.indexes["sequence"].get_loc(id))
    start = int(dataset["residue_start"].values[i])
    length = int(dataset["length"].values[i])
    truncated = bool(dataset["truncated"].values[i])
    count = int(dataset.attrs["max_residues"]) if truncated else length
    values = dataset["residue_embedding"].isel(residue=slice(start, start + count))
    values = values.rename(residue="position").assign_coords(position=np.arange(count))
    values.attrs["sequence"] = str(id)
    return values
