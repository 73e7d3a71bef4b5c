"""Run one paysaga worker process (the Faust worker, without its logging traps)."""

from __future__ import annotations

import gc
import logging
import sys

import faust

from paysaga.streams.app.net import free_port
from paysaga.streams.app.settings import Settings


class PaysagaWorker(faust.Worker):
    """Faust's worker without the terminal spinner.

    Faust's spinner sets the ROOT logger to DEBUG so it can spin on every record; every
    aiokafka/Faust `logger.debug` then builds a record (about 14 % of the hot path measured:
    docs/traps.md#faust-spinner-sets-the-root-logger-to-debug). We keep the root logger at
    the level asked for.
    """

    def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
        self.spinner = None
        logger.setLevel(level or logging.WARNING)


def tune_gc(settings: Settings) -> None:
    """Make the cyclic garbage collector cheap for a worker (docs/architecture.md#gc).

    The saga frees nearly everything it allocates by reference counting (87 objects found
    by the collector over a 10,000-payment backlog), yet at Python's default threshold of
    700 allocations the collector ran about 540 times and took 13 % of the worker's CPU,
    re-examining the payment and request caches each time. Objects alive once the app is
    built (modules, the topology, schemas) are frozen out of every later collection, and the
    young generation is collected every `gc_gen0_threshold` allocations.
    """
    gc.collect()
    gc.freeze()
    if settings.gc_gen0_threshold:
        _, gen1, gen2 = gc.get_threshold()
        gc.set_threshold(settings.gc_gen0_threshold, gen1, gen2)


def run_worker(settings: Settings) -> None:
    """Start the worker and block until it is stopped (SIGINT/SIGTERM)."""
    from paysaga.streams.app.assembly import create_app

    if settings.web_port == 0:
        settings = settings.model_copy(update={"web_port": free_port()})
    (settings.data_dir / settings.app_id / "faust").mkdir(parents=True, exist_ok=True)
    paysaga = create_app(settings)
    print(
        f"paysaga worker {settings.app_id}: bootstrap {settings.bootstrap}, "
        f"state {settings.data_dir}, web views http://{settings.web_host}:{settings.web_port}/",
        flush=True,
    )
    tune_gc(settings)
    worker = PaysagaWorker(
        paysaga.app,
        paysaga.engine,
        loglevel=settings.log_level,
        quiet=True,
        redirect_stdouts=False,
        stdout=sys.stdout,
        stderr=sys.stderr,
    )
    worker.execute_from_commandline()
