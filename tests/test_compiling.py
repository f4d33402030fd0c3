"""The compile policy's driver step: small or CPU runs never compile, large GPU runs ask."""

from __future__ import annotations

from virnuc_dask.engine.compiling import COMPILE_MIN_TOKENS, run_setting


def test_a_setting_given_is_obeyed():
    assert run_setting(True, on_gpu=False, tokens=1, workers=1) is True
    assert run_setting(False, on_gpu=True, tokens=10**9, workers=1) is False


def test_unset_compiles_only_large_gpu_runs_and_leaves_the_choice_to_the_workers():
    big = COMPILE_MIN_TOKENS * 2
    assert run_setting(None, on_gpu=True, tokens=big, workers=2) is None
    assert run_setting(None, on_gpu=True, tokens=big - 1, workers=2) is False
    assert run_setting(None, on_gpu=False, tokens=10**9, workers=1) is False
