"""paysaga's exactly-once stream processing engine; it knows nothing of payments.

The public surface (docs/architecture.md#the-engine): declare agents on a `Topology`, give
it an `EngineConfig`, run an `ExactlyOnceEngine` as a service of the worker. Agents see a
`ProcessorContext`.
"""

from paysaga.streams.engine.config import EngineConfig, StartAt
from paysaga.streams.engine.fetch import ExactlyOnceEngine
from paysaga.streams.engine.processor import (
    Agent,
    BadRecord,
    ProcessorContext,
    PunctuationType,
    Schedule,
    Timer,
    TopologyError,
    UndeclaredTable,
    WindowSpec,
)
from paysaga.streams.engine.topology import AgentBuilder, Topology

__all__ = [
    "Agent",
    "AgentBuilder",
    "BadRecord",
    "EngineConfig",
    "ExactlyOnceEngine",
    "ProcessorContext",
    "PunctuationType",
    "Schedule",
    "StartAt",
    "Timer",
    "Topology",
    "TopologyError",
    "UndeclaredTable",
    "WindowSpec",
]
