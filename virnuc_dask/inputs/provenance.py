"""Read provenance: where each peptide of a translated run comes from, for the output file.

Along the output's ``sequence`` dimension (one row per peptide): ``read`` (the id of the read
or contig it was translated from), ``frame`` (``F1`` .. ``R3``), ``strand`` (``+`` or ``-``),
``nt_start`` and ``nt_end`` (the bases it was translated from, 0-based and half-open, on the
forward strand of its read, or of its piece with ``split_bp``), and with ``split_bp``
``piece`` (the ``k`` of ``<id>_chunk_<k>``) and ``piece_start`` (the piece's first base in
the read: ``piece_start + nt_start`` is the peptide's place in the read); in ``orfs`` mode
``orf`` (the piece of the frame, 1 + the stops before it). The file's attributes count the
reads and list the first ids of those without any peptide.

The read ids are not stored twice: a peptide's id begins with its read's id, and
:attr:`ReadProvenance.read_bytes` says how many of its bytes that is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from virnuc_dask.inputs.translate import FRAMES

#: Ids of reads without any peptide listed in the report and the output.
LISTED_WITHOUT = 10
_ARRAYS = ("read_bytes", "frame", "nt_start", "nt_end", "piece", "piece_start", "orf")


@dataclass
class ReadProvenance:
    """Per peptide, its read, frame and bases; per run, the reads and the settings.

    Attributes
    ----------
    read_bytes
        Per peptide, the length in bytes of its read's id, which begins its own id (int32).
    frame
        Per peptide, an index into ``FRAMES`` (int8).
    nt_start, nt_end
        Per peptide, its bases on the forward strand of its read or piece (int64).
    piece, piece_start
        Per peptide with ``split_bp``: its piece's number (1-based) and first base (else None).
    orf
        Per peptide in ``orfs`` mode: its place among its frame's pieces (else None).
    reads
        Reads in the inputs.
    without_peptides
        Reads that gave no peptide.
    first_without
        The ids of the first of those (at most :data:`LISTED_WITHOUT`).
    settings
        The translation settings: ``translate``, ``genetic_code``, ``frames``, ``min_peptide``
        and ``split_bp`` (None when not set).
    """

    read_bytes: np.ndarray
    frame: np.ndarray
    nt_start: np.ndarray
    nt_end: np.ndarray
    piece: np.ndarray | None = None
    piece_start: np.ndarray | None = None
    orf: np.ndarray | None = None
    reads: int = 0
    without_peptides: int = 0
    first_without: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.frame)

    def save(self, directory: str | Path) -> None:
        """Write the arrays as ``.npy`` files and the rest as ``provenance.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        present = [name for name in _ARRAYS if getattr(self, name) is not None]
        for name in present:
            np.save(directory / f"provenance-{name}.npy", getattr(self, name))
        meta = {
            "arrays": present,
            "reads": self.reads,
            "without_peptides": self.without_peptides,
            "first_without": self.first_without,
            "settings": self.settings,
        }
        (directory / "provenance.json").write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, directory: str | Path) -> ReadProvenance | None:
        """Read what :meth:`save` wrote (arrays memory-mapped); None if the run has none."""
        directory = Path(directory)
        path = directory / "provenance.json"
        if not path.is_file():
            return None
        meta = json.loads(path.read_text())
        arrays = {
            name: np.load(directory / f"provenance-{name}.npy", mmap_mode="r")
            for name in meta.pop("arrays")
        }
        return cls(**arrays, **meta)

    def read_ids(self, id_bytes: np.ndarray, id_offsets: np.ndarray) -> list[str]:
        """The read id of every peptide, from the peptides' ids (an index's id arrays)."""
        data = np.asarray(id_bytes).tobytes()
        starts = np.asarray(id_offsets[:-1]).tolist()
        return [
            data[start : start + size].decode()
            for start, size in zip(starts, np.asarray(self.read_bytes).tolist(), strict=True)
        ]

    def variables(self, id_bytes: np.ndarray, id_offsets: np.ndarray) -> dict[str, np.ndarray]:
        """The output's variables along ``sequence``, by name (strings as object arrays)."""
        frame = np.asarray(self.frame)
        names = np.array(FRAMES, dtype="S2")
        out = {
            "read": np.array(self.read_ids(id_bytes, id_offsets), dtype=object),
            "frame": names[frame],
            "strand": np.where(frame < 3, b"+", b"-").astype("S1"),
            "nt_start": np.asarray(self.nt_start, dtype=np.int64),
            "nt_end": np.asarray(self.nt_end, dtype=np.int64),
        }
        if self.piece is not None:
            out["piece"] = np.asarray(self.piece, dtype=np.int32)
            out["piece_start"] = np.asarray(self.piece_start, dtype=np.int64)
        if self.orf is not None:
            out["orf"] = np.asarray(self.orf, dtype=np.int32)
        return out

    def attributes(self) -> dict:
        """Attributes of the output file: the translation settings and the reads' counts."""
        attrs = {name: value for name, value in self.settings.items() if value is not None}
        attrs["reads"] = self.reads
        attrs["reads_without_peptides"] = self.without_peptides
        attrs["reads_without_peptides_first"] = json.dumps(self.first_without)
        return attrs

    def summary(self) -> str:
        """One line for the run report: reads, and those without a peptide."""
        return reads_summary(self.reads, self.without_peptides, self.first_without)


def reads_summary(reads: int, without: int, first: list[str] | tuple[str, ...]) -> str:
    """``1,000 reads, 12 with no kept frame (r3, r9, ...)``."""
    line = f"{reads:,} reads, {without:,} with no kept frame"
    if first:
        more = ", ..." if without > len(first) else ""
        line += f" ({', '.join(first)}{more})"
    return line
