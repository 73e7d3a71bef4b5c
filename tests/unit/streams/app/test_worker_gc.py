"""The worker's garbage-collector tuning (streams/app/worker.py:tune_gc)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from paysaga.streams.app.settings import Settings
from paysaga.streams.app.worker import tune_gc


@pytest.fixture
def gc_state() -> Iterator[None]:
    """Put the interpreter's collector back as it was: the rest of the suite shares it."""
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_freezes_start_up_objects_and_raises_the_young_threshold(gc_state: None) -> None:
    _, gen1, gen2 = gc.get_threshold()
    tune_gc(Settings.from_env({"PAYSAGA_GC_GEN0_THRESHOLD": "12345"}))
    assert gc.get_threshold() == (12345, gen1, gen2)
    assert gc.get_freeze_count() > 0  # what existed at start-up is out of every collection


def test_zero_keeps_the_interpreter_default(gc_state: None) -> None:
    before = gc.get_threshold()
    tune_gc(Settings.from_env({"PAYSAGA_GC_GEN0_THRESHOLD": "0"}))
    assert gc.get_threshold() == before


def test_default_is_fifty_thousand() -> None:
    assert Settings.from_env({}).gc_gen0_threshold == 50_000
