"""The driver's plan, in numpy: windows of long sequences, chunks dealt over workers, the
fingerprint.

:mod:`~virnuc_dask.plan.windows` (the window rule and token counts),
:mod:`~virnuc_dask.plan.partition` (length-sorted, stride-dealt chunks) and
:mod:`~virnuc_dask.plan.fingerprint` (what identifies a run's numbers). No Dask, no torch.
"""
