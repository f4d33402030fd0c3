"""The former name of :mod:`.publish`, for the modules that still import it from here.

It holds no code of its own, and goes once every import names :mod:`.publish`.
"""

from virnuc_dask.output.publish import publish, put_shard, shard_source, stand_ins

__all__ = ["publish", "put_shard", "shard_source", "stand_ins"]
