"""What a worker runs: its agents and the tables they keep.

`Settings.topology` names a factory `module:function(settings) -> Topology`; the default is
paysaga's own. Tests and the benchmark run their pipelines through the same worker, engine
and transactions by naming another factory.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from paysaga.streams.engine import AgentSpec
from paysaga.streams.settings import Settings


@dataclass(frozen=True)
class Topology:
    agents: list[AgentSpec]
    tables: tuple[str, ...]


def load_topology(settings: Settings) -> Topology:
    module, _, name = settings.topology.partition(":")
    factory = getattr(importlib.import_module(module), name)
    return factory(settings)


def paysaga_topology(settings: Settings) -> Topology:
    """The payment topology: intake today; the saga, retries and reconciliation next."""
    from paysaga.agents.intake import IntakeStep, intake_agents
    from paysaga.schemas.codec import AvroCodec
    from paysaga.schemas.registry import SchemaRegistry
    from paysaga.streams.topics import Topics
    from paysaga.tables import TABLES

    names = Topics(settings.topic_prefix)
    step = IntakeStep(AvroCodec(SchemaRegistry()))
    agents = intake_agents(
        step, names.initiated, names.initiated_repartition, names.status, names.dlq,
        settings.partitions,
    )  # fmt: skip
    return Topology(agents, TABLES)
