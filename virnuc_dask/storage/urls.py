"""What a URL is, and the fsspec options that travel with a run.

fsspec URLs (``s3://``, ``https://``) become :class:`~virnuc_dask.storage.remote.Remote`;
everything else is a local path, :class:`~virnuc_dask.storage.local.Local` (the factory of both
is :func:`~virnuc_dask.storage.remote.place`, and :func:`is_url` the one test between them).
Local inputs, work directories and outputs keep the fast paths they have (memory maps,
``O_EXCL``, atomic renames, hard links): no local code path goes through fsspec.

Decisions:

- **What is a URL**: ``PROTOCOL://...`` for any protocol but ``file``; ``file://`` URLs and
  everything else are local paths. ``-`` is standard input (:data:`STDIN`), never a file.
- **Storage options** (credentials, endpoint, region, ...) are parsed once into a frozen
  :class:`StorageOptions` that travels with the run's other small settings to the workers and
  is handed to every fsspec call, on the driver and on the workers. Its ``repr`` shows only
  the number of options, so that it never prints a secret in a log, a traceback or the
  dashboard; it is never written into the work directory or the output's attributes. The
  standard places come first: ``AWS_ENDPOINT_URL``, ``AWS_PROFILE`` and the other variables
  and files botocore reads (and gcsfs's, adlfs's) need no option at all.
- **From the command line**, ``--storage-options`` takes JSON or ``@FILE`` (a JSON file).
  JSON given inline that holds a credential (a key whose name says secret, password, token,
  key or credential) is refused: a command line is visible to every user of the machine
  (``ps``) and kept in shell histories. Python callers pass a dict.
- **Listings are not cached** on S3 and GCS (``use_listings_cache=False`` unless given): a lock,
  a marker or a shard must be seen the moment another process wrote it.
- **Missing packages** name the extra that brings them (``pip install 'virnuc-dask[s3]'``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from virnuc_dask.errors import VirnucError

logger = logging.getLogger(__name__)


#: The input name that reads standard input.
STDIN = "-"


_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


#: The package extra that brings each protocol's fsspec driver.
EXTRAS = {
    "s3": ("s3fs", "s3"),
    "s3a": ("s3fs", "s3"),
    "gs": ("gcsfs", "gcs"),
    "gcs": ("gcsfs", "gcs"),
    "http": ("aiohttp", "http"),
    "https": ("aiohttp", "http"),
    "abfs": ("adlfs", "azure"),
    "az": ("adlfs", "azure"),
}


#: Protocols whose filesystems take ``use_listings_cache`` (turned off, see the decisions).
_LISTING_CACHES = ("s3", "s3a", "gs", "gcs")


#: Words in an option's name that mark a credential (refused inline on the command line).
_SECRET = re.compile(r"secret|password|passwd|token|key|credential", re.IGNORECASE)


def is_url(text: object) -> bool:
    """Whether ``text`` is an fsspec URL (any protocol but ``file``), or a :class:`Remote`.

    A :class:`~virnuc_dask.storage.places.Place` is judged by its text: a ``Remote``'s is its
    URL, a ``Local``'s a path, which never holds ``://`` (``pathlib`` folds ``//`` into ``/``).
    """
    from virnuc_dask.storage.places import Place

    if isinstance(text, Place):
        text = str(text)
    if not isinstance(text, str):
        return False
    found = _URL.match(text)
    return found is not None and found.group(1).lower() != "file"


def local_path(text: str | os.PathLike) -> str | os.PathLike:
    """A ``file://`` URL as the path it names; anything else unchanged."""
    if isinstance(text, str) and text.lower().startswith("file://"):
        return text[len("file://") :]
    return text


@dataclass(frozen=True)
class StorageOptions:
    """Options for fsspec (credentials, endpoint, region, ...), hidden from logs.

    Parameters
    ----------
    text
        The options as one JSON object. Build it with :meth:`parse` or :meth:`of`.
    """

    text: str = field(default="{}", repr=False)

    def __repr__(self) -> str:
        count = len(self.kwargs())
        return f"StorageOptions(<{count} option{'s' if count != 1 else ''}, not shown>)"

    def kwargs(self) -> dict:
        """The options as keyword arguments for fsspec."""
        return json.loads(self.text)

    @classmethod
    def of(cls, value: dict | str | StorageOptions | None) -> StorageOptions:
        """Options from a dict, a JSON text, ``@FILE``, or options already made (Python API)."""
        if isinstance(value, StorageOptions):
            return value
        if value is None:
            return cls()
        if isinstance(value, dict):
            try:
                return cls(json.dumps(value, sort_keys=True))
            except TypeError as error:
                raise VirnucError(
                    f"storage options must be JSON values (strings, numbers, lists, dicts): {error}"
                ) from None
        return cls.parse(value, command_line=False)

    @classmethod
    def parse(cls, text: str, *, command_line: bool = True) -> StorageOptions:
        """Parse ``--storage-options``: a JSON object, or ``@FILE`` holding one.

        Raises
        ------
        VirnucError
            Not a JSON object; a file that cannot be read; or, given inline on the command
            line, an option that looks like a credential (see the module's decisions).
        """
        inline = not text.startswith("@")
        where = "--storage-options" if inline else f"storage options file {text[1:]}"
        if not inline:
            try:
                text = Path(text[1:]).expanduser().read_text()
            except OSError as error:
                raise VirnucError(
                    f"cannot read the {where}: {error.strerror or error}; give a JSON file"
                ) from None
        try:
            value = json.loads(text)
        except ValueError as error:
            # The text itself is not quoted: it may hold a credential.
            raise VirnucError(f"{where} is not valid JSON ({error.msg}, at {error.pos})") from None
        if not isinstance(value, dict):
            raise VirnucError(f'{where} must be a JSON object, such as {{"anon": true}}')
        if inline and command_line:
            secret = _secret_names(value)
            if secret:
                raise VirnucError(
                    f"--storage-options holds a credential ({', '.join(secret)}) in clear text "
                    "on the command line, where other users and the shell's history see it; "
                    "put it in a file (--storage-options @FILE), a profile (AWS_PROFILE) or "
                    "the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
                )
        return cls(json.dumps(value, sort_keys=True))


def _secret_names(value: object, prefix: str = "") -> list[str]:
    """The names of the options (nested ones too) that look like credentials."""
    found = []
    if isinstance(value, dict):
        for name, inner in value.items():
            if _SECRET.search(str(name)) and not isinstance(inner, dict | bool):
                found.append(prefix + str(name))
            found += _secret_names(inner, f"{prefix}{name}.")
    return found


def filesystem(url: str, storage: StorageOptions | None = None):
    """The fsspec filesystem of ``url`` and the path within it.

    Raises
    ------
    VirnucError
        When the protocol's package is missing (naming the extra that brings it) or fsspec
        refuses the URL or the options.
    """
    import fsspec

    kwargs = (storage or StorageOptions()).kwargs()
    scheme = _URL.match(url).group(1).lower() if _URL.match(url) else "file"
    if scheme in _LISTING_CACHES:
        kwargs.setdefault("use_listings_cache", False)
    try:
        return fsspec.core.url_to_fs(url, **kwargs)
    except ImportError:
        package, extra = EXTRAS.get(scheme, (f"the fsspec driver of {scheme}://", None))
        install = f"pip install 'virnuc-dask[{extra}]'" if extra else f"install {package}"
        raise VirnucError(
            f"{url}: {scheme}:// URLs need {package}, which is not installed; {install}"
        ) from None
    except (ValueError, TypeError) as error:
        # Not the options' values: they may hold a credential.
        raise VirnucError(f"{url}: fsspec cannot use this URL ({type(error).__name__})") from None
