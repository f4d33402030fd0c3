"""The one configuration object of a run, mirrored into ``dask.config`` under ``virnuc-dask``.

Every setting has its default in ``virnuc-dask.yaml`` beside this module, which is registered
with Dask's configuration system: cluster users can override any default in their own Dask
YAML files or with environment variables (``DASK_VIRNUC_DASK__TOKENS_PER_BATCH=32768``), and
explicit arguments of :func:`virnuc_dask.embed` or the command line win over both.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import dask.config
import yaml

from virnuc_dask.errors import VirnucError, option
from virnuc_dask.inputs.duplicates import DUPLICATE_POLICIES
from virnuc_dask.inputs.peptides import TRANSLATIONS, Translation
from virnuc_dask.model.registry import model_spec
from virnuc_dask.model.tokens import MODEL_WINDOW
from virnuc_dask.plan.windows import LONG_MODES

_DEFAULTS_FILE = Path(__file__).with_name("virnuc-dask.yaml")
dask.config.update_defaults(yaml.safe_load(_DEFAULTS_FILE.read_text()))

#: Compute precisions: ``auto`` is bf16 on a GPU and fp32 on a CPU.
DTYPES = ("auto", "fp32", "bf16", "fp16")
#: Precisions of the stored embeddings.
OUTPUT_DTYPES = ("float32", "float16")
#: Where a run's workers come from without a scheduler (:func:`virnuc_dask.embed`'s ``cluster``).
CLUSTERS = ("local", "slurm", "slurm-allocation")
#: Settings that apply only with ``translate``.
_TRANSLATION_OPTIONS = ("genetic_code", "frames", "min_peptide", "split_bp")


@dataclass(frozen=True)
class EmbedConfig:
    """Settings of one embedding run.

    Parameters
    ----------
    model
        fair-esm model name, e.g. ``esm2_t36_3B_UR50D``.
    checkpoint
        Checkpoint file in fair-esm's format; default: the torch hub cache.
    random_weights
        Use seeded random weights of the architecture (smoke tests, capacity planning).
    seed
        Seed of the random weights.
    layers
        Layers to pool, numbered as fair-esm numbers them; default: the last.
    dtype
        Compute precision: ``auto``, ``fp32``, ``bf16`` or ``fp16``.
    output_dtype
        Stored precision: ``float32`` or ``float16``.
    max_residues
        Residues kept per sequence; longer ones are truncated and flagged (at most 1022).
    tokens_per_batch
        Token budget of one forward pass; default: chosen by the engine.
    chunk_tokens
        Token budget of one task (one shard); default: at least 8 chunks per worker.
    workers
        Workers of a local cluster; default: one per GPU, or a share of the CPU cores.
    invalid_to_x
        Read letters outside the alphabet as ``X`` instead of refusing the input.
    as_protein
        Read a protein file whose letters are those of nucleotides (the rule of
        :mod:`~virnuc_dask.inputs.nucleotide`) as proteins, instead of refusing it.
    duplicate_ids
        ``error`` or ``suffix`` (keep both, renaming later ones ``ID.2``, ...).
    compile
        ``torch.compile`` the GPU engine's layer. Default: not for small jobs; for large ones
        each GPU worker decides, compiling only without Triton (with it, the fused kernels of
        :mod:`virnuc_dask.engine.kernels` run as fast and start in a second).
    retries
        Times a failing chunk is retried before the run stops.
    chunk_time_limit
        Seconds a chunk may run before its worker is ended and the chunk given to another;
        default (None): ten times its expected time at the speed measured so far; 0: no limit.
    wait_limit
        Seconds a run waits for an unresponsive scheduler, or for workers when the cluster has
        none, before it stops (it says why at intervals while it waits).
    translate
        ``"six-frame"``: the inputs are nucleotide reads (FASTA or FASTQ); embed the peptides
        of their six-frame translation. None: the inputs are proteins.
    genetic_code
        NCBI translation table of ``translate``.
    frames
        ``"stop-free"`` (whole frames without a stop codon, VirNucPro's rule) or ``"orfs"``
        (the pieces of every frame between stop codons).
    min_peptide
        Shortest peptide kept; default 1 for ``stop-free``, 30 for ``orfs``.
    split_bp
        Cut reads longer than this into pieces of this many bases before translating, as
        VirNucPro does; None: no cutting.
    per_residue
        Also store every residue's embedding (``residue_embedding``, ``residue_start``).
    residue_dtype
        Stored precision of the per-residue values: ``float16`` or ``float32``.
    long
        Sequences longer than ``max_residues``: ``truncate`` (embed the first
        ``max_residues``, flagged) or ``window`` (all residues, in overlapping windows).
    dedup
        Embed each distinct sequence once and give its duplicates its values
        (:mod:`~virnuc_dask.plan.distinct`); False embeds every row.
    cache
        An embedding cache (folder or URL) shared across runs: sequences found there are
        not embedded again, and this run's new ones are added (:mod:`virnuc_dask.cache`).
        Pooled embeddings only: not with ``per_residue``.
    """

    model: str = "esm2_t36_3B_UR50D"
    checkpoint: str | None = None
    random_weights: bool = False
    seed: int = 0
    layers: tuple[int, ...] | None = None
    dtype: str = "auto"
    output_dtype: str = "float32"
    max_residues: int = MODEL_WINDOW
    tokens_per_batch: int | None = None
    chunk_tokens: int | None = None
    workers: int | None = None
    invalid_to_x: bool = False
    as_protein: bool = False
    duplicate_ids: str = "error"
    compile: bool | None = None
    retries: int = 2
    chunk_time_limit: float | None = None
    wait_limit: float = 600.0
    # The reads front end (``translate``); the rest apply only with it.
    translate: str | None = None
    genetic_code: int = 1
    frames: str = "stop-free"
    min_peptide: int | None = None
    split_bp: int | None = None
    # Per-residue output and long sequences.
    per_residue: bool = False
    residue_dtype: str = "float16"
    long: str = "truncate"
    # Each distinct sequence once, in a run and across runs.
    dedup: bool = True
    cache: str | None = None

    @classmethod
    def from_settings(cls, **settings) -> EmbedConfig:
        """Build a config from ``dask.config`` defaults overridden by the given settings.

        Settings given as ``None`` fall back to the default. Unknown names are an error.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(settings) - names
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
        values = {name: dask.config.get(f"virnuc-dask.{name}") for name in names}
        values.update({k: v for k, v in settings.items() if v is not None})
        if values["layers"] is not None:
            # A layer asked for twice is stored once, in the order first given.
            values["layers"] = tuple(dict.fromkeys(int(n) for n in values["layers"]))
        config = cls(**values)
        config.validate()
        if settings.get("residue_dtype") is not None and not config.per_residue:
            raise VirnucError(
                f"{option('residue_dtype', settings['residue_dtype'])} applies to per-residue "
                f"output: add {option('per_residue')}"
            )
        given = [name for name in _TRANSLATION_OPTIONS if settings.get(name) is not None]
        if given and config.translate is None:
            raise VirnucError(
                f"{option(given[0], settings[given[0]])} applies to nucleotide reads: add "
                f"{option('translate', 'six-frame')}"
            )
        if settings.get("as_protein") and config.translate is not None:
            raise VirnucError(
                f"{option('as_protein')} applies to proteins: drop "
                f"{option('translate', config.translate)}"
            )
        return config

    def validate(self) -> None:
        """Raise :class:`VirnucError` for a setting out of range."""
        spec = model_spec(self.model)
        if self.dtype not in DTYPES:
            raise VirnucError(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.output_dtype not in OUTPUT_DTYPES:
            raise VirnucError(f"output dtype must be one of {', '.join(OUTPUT_DTYPES)}")
        if not 1 <= self.max_residues <= MODEL_WINDOW:
            raise VirnucError(f"max residues must be between 1 and {MODEL_WINDOW}")
        for layer in self.layers or ():
            if not 0 <= layer <= spec.num_layers:
                raise VirnucError(
                    f"layer {layer} does not exist in {spec.name}: it has layers 0 to "
                    f"{spec.num_layers}"
                )
        for name in ("tokens_per_batch", "chunk_tokens", "workers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise VirnucError(f"{name.replace('_', ' ')} must be positive, got {value}")
        if self.chunk_time_limit is not None and self.chunk_time_limit < 0:
            raise VirnucError("chunk time limit must be 0 (none) or a number of seconds")
        if self.wait_limit <= 0:
            raise VirnucError("wait limit must be a positive number of seconds")
        if self.residue_dtype not in OUTPUT_DTYPES:
            raise VirnucError(
                f"residue dtype must be one of {', '.join(OUTPUT_DTYPES)}, not "
                f"{self.residue_dtype!r}"
            )
        if self.long not in LONG_MODES:
            raise VirnucError(f"long must be one of {', '.join(LONG_MODES)}, not {self.long!r}")
        if self.duplicate_ids not in DUPLICATE_POLICIES:
            raise VirnucError(f"duplicate ids must be one of {', '.join(DUPLICATE_POLICIES)}")
        if self.cache is not None and self.per_residue:
            raise VirnucError(
                f"{option('cache', self.cache)} holds pooled embeddings only; a run with "
                f"{option('per_residue')} cannot use it (drop one of the two)"
            )
        if self.translate is not None:
            if self.translate not in TRANSLATIONS:
                raise VirnucError(
                    f"translate must be one of {', '.join(TRANSLATIONS)}, not {self.translate!r}"
                )
            self.translation().validate()

    def translation(self) -> Translation | None:
        """How reads become peptides, or None when the inputs are proteins."""
        if self.translate is None:
            return None
        return Translation(
            genetic_code=self.genetic_code,
            frames=self.frames,
            min_peptide=self.min_peptide,
            split_bp=self.split_bp,
        )

    def layer_list(self) -> list[int]:
        """The layers to pool, defaulting to the model's last."""
        return list(self.layers) if self.layers else [model_spec(self.model).num_layers]
