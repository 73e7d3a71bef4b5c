"""What a worker runs: its agents and the tables they keep.

`Settings.topology` names a factory `module:function(settings) -> Topology`; the default is
paysaga's own. Tests and the benchmark run their pipelines through the same worker, engine
and transactions by naming another factory.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from paysaga.streams.app.settings import Settings
from paysaga.streams.engine.core import AgentSpec, Punctuator


@dataclass(frozen=True)
class Topology:
    agents: list[AgentSpec]
    tables: tuple[str, ...]
    punctuators: tuple[Punctuator, ...] = ()


def load_topology(settings: Settings) -> Topology:
    module, _, name = settings.topology.partition(":")
    factory = getattr(importlib.import_module(module), name)
    return factory(settings)


def paysaga_topology(settings: Settings) -> Topology:
    """The payment topology: idempotent intake, then the saga (DESIGN.md section 2)."""
    from paysaga.agents.intake import IntakeStep, intake_agents, purge_expired_keys
    from paysaga.agents.saga import SagaAgent
    from paysaga.domain.saga import Orchestrator, SagaPolicy
    from paysaga.schemas.codec import AvroCodec
    from paysaga.schemas.registry import SchemaRegistry
    from paysaga.streams.app.topics import Topics
    from paysaga.tables import TABLES

    names = Topics(settings.topic_prefix)
    codec = AvroCodec(SchemaRegistry())
    policy = SagaPolicy(
        command_timeout_ms=settings.command_timeout_ms, auth_window_ms=settings.auth_window_ms
    )
    saga = SagaAgent(codec, names, settings.partitions, Orchestrator(policy))
    agents = [
        *intake_agents(IntakeStep(codec), names, settings.partitions, settings.idempotency_ttl_ms),
        *saga.agents(),
    ]
    return Topology(agents, TABLES, (purge_expired_keys, saga.punctuate))
