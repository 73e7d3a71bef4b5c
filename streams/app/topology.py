"""What a worker runs: the application's topology.

`Settings.topology` names a factory `module:function(settings) -> Topology`; the default is
paysaga's own. Tests and the benchmark run their pipelines through the same worker, engine
and transactions by naming another factory.
"""

from __future__ import annotations

import importlib

from paysaga.agents.intake import IntakeStep, add_intake
from paysaga.agents.reconciliation import ReconAgent
from paysaga.agents.saga import SagaAgent
from paysaga.agents.settlement import SettlementAgent
from paysaga.domain.reconciliation import ReconPolicy
from paysaga.domain.saga import Orchestrator, SagaPolicy
from paysaga.domain.settlement import SettlementPolicy
from paysaga.schemas.codec import AvroCodec
from paysaga.schemas.registry import SchemaRegistry
from paysaga.streams.app.settings import Settings
from paysaga.streams.app.topics import Topics
from paysaga.streams.engine import Topology


def load_topology(settings: Settings) -> Topology:
    module, _, name = settings.topology.partition(":")
    factory = getattr(importlib.import_module(module), name)
    topology = factory(settings)
    if not isinstance(topology, Topology):
        raise TypeError(f"{settings.topology} returned {type(topology).__name__}, not a Topology")
    return topology


def recon_policy(settings: Settings) -> ReconPolicy:
    return ReconPolicy(window_ms=settings.recon_window_ms, grace_ms=settings.recon_grace_ms,
                       tolerance_days=settings.recon_tolerance_days,
                       retention_ms=settings.recon_retention_ms)  # fmt: skip


def paysaga_topology(settings: Settings) -> Topology:
    """The payment topology: idempotent intake, then the saga
    (docs/architecture.md#the-flow-of-a-payment), reconciliation of what was captured
    against the bank (docs/reconciliation.md) and settlement batches (docs/settlement.md)."""
    names = Topics(settings.topic_prefix, settings.input_topic_prefix)
    codec = AvroCodec(SchemaRegistry())
    settlement = SettlementPolicy(batch_ms=settings.settlement_batch_ms,
                                  cutoff_ms=settings.settlement_cutoff_ms,
                                  retention_ms=settings.settlement_retention_ms)  # fmt: skip
    policy = SagaPolicy(command_timeout_ms=settings.command_timeout_ms,
                        retry=settings.retry_policy(), auth_window_ms=settings.auth_window_ms,
                        settlement=settlement)  # fmt: skip
    topology = Topology(serializer=codec.encode)
    intake = IntakeStep(codec)  # one step for both agents: its memo of parsed requests
    add_intake(topology, intake, names, settings.partitions, settings.idempotency_ttl_ms)
    SagaAgent(codec, names, settings.partitions, Orchestrator(policy), intake,
              breaker=settings.breaker_config()).add_to(topology)  # fmt: skip
    ReconAgent(codec, names, settings.partitions, recon_policy(settings)).add_to(topology)
    SettlementAgent(codec, names, settlement).add_to(topology)
    return topology
