"""A topology: the agents of one application, declared like Faust agents, checked once.

    topology = Topology(serializer=codec.encode)

    @topology.agent("intake", sources=[t.initiated], tables=[IDEMPOTENCY], decode=parse,
                    event_time=lambda e: e.occurred_at)
    def intake(ctx: ProcessorContext, event: PaymentInitiated) -> None: ...

    @intake.schedule(60_000, PunctuationType.STREAM_TIME)
    def purge(ctx: ProcessorContext, now: int) -> None: ...

Everything the engine would otherwise discover at run time is refused here, when the
topology is built (docs/architecture.md#the-processor-api): a table, window or timer an
agent uses without declaring it, two agents (or schedules, timers, windows) of one name, an
interval that is not positive. Two agents on one source are supported (fan-out): each
record runs through both, in declaration order, inside the one transaction of its batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any

from aiokafka.structs import ConsumerRecord

from paysaga.streams.engine.processor import (
    Agent,
    ContextRuntime,
    ProcessorContext,
    PunctuationType,
    Schedule,
    Serializer,
    Timer,
    TopologyError,
    WindowSpec,
)
from paysaga.tables.timers import KeyedTimers
from paysaga.tables.windows import Window, Windows, WindowStore


def _no_serializer(schema: str, fields: Mapping[str, Any]) -> bytes:
    raise TopologyError(f"emit({schema!r}): this topology has no serializer")


class AgentBuilder:
    """An agent being declared: decorate its schedules, timers and windows onto it."""

    def __init__(self, topology: Topology, agent: Agent) -> None:
        self._topology = topology
        self.agent = agent

    @property
    def name(self) -> str:
        return self.agent.name

    def _extend(self, **changes: Any) -> None:
        self.agent = replace(self.agent, **changes)

    def schedule(
        self, interval_ms: int, type: PunctuationType, name: str | None = None
    ) -> Callable[[Callable[[ProcessorContext, int], None]], Callable[..., None]]:
        """Decorator: run `fn(ctx, time)` every `interval_ms` of stream or wall-clock time."""

        def register(fn: Callable[[ProcessorContext, int], None]) -> Callable[..., None]:
            sched = Schedule(name or fn.__name__, interval_ms, type, fn)
            self._extend(schedules=(*self.agent.schedules, sched))
            return fn

        return register

    def timer(
        self, name: str, table: str, type: PunctuationType
    ) -> Callable[[Callable[[ProcessorContext, bytes, int], None]], Callable[..., None]]:
        """Decorator: `fn(ctx, key, due)` fires the durable per-key timers `name`."""

        def register(fn: Callable[[ProcessorContext, bytes, int], None]) -> Callable[..., None]:
            self._extend(timers=(*self.agent.timers, Timer(name, table, type, fn)))
            return fn

        return register

    def window(
        self, name: str, table: str, windows: Windows
    ) -> Callable[[Callable[[ProcessorContext, Window, bytes], None]], Callable[..., None]]:
        """Decorator: `fn(ctx, window, value)` emits a window's result when it closes."""

        def register(fn: Callable[[ProcessorContext, Window, bytes], None]) -> Callable[..., None]:
            self._extend(windows=(*self.agent.windows, WindowSpec(name, table, windows, fn)))
            return fn

        return register


class Topology:
    """The agents of one application and the tables they keep."""

    def __init__(self, serializer: Serializer | None = None) -> None:
        self.serializer: Serializer = serializer or _no_serializer
        self._builders: list[AgentBuilder] = []

    def agent(
        self,
        name: str,
        *,
        sources: Iterable[str],
        tables: Iterable[str] = (),
        decode: Callable[[ConsumerRecord], Any] | None = None,
        event_time: Callable[[Any], int] | None = None,
    ) -> Callable[[Callable[[ProcessorContext, Any], None]], AgentBuilder]:
        """Decorator: declare `fn(ctx, value)` as an agent (see the module docstring)."""

        def register(fn: Callable[[ProcessorContext, Any], None]) -> AgentBuilder:
            return self.add(Agent(name, tuple(sources), fn, tuple(tables), decode, event_time))

        return register

    def builder(self, name: str) -> AgentBuilder:
        """The declared agent `name`, to add schedules, timers or windows to it."""
        for builder in self._builders:
            if builder.name == name:
                return builder
        raise TopologyError(f"no agent named {name!r}")

    def add(self, agent: Agent) -> AgentBuilder:
        builder = AgentBuilder(self, agent)
        self._builders.append(builder)
        return builder

    # ---- what the engine reads (checked) ------------------------------------------------
    @property
    def agents(self) -> list[Agent]:
        agents = [b.agent for b in self._builders]
        self._check(agents)
        return agents

    @property
    def tables(self) -> tuple[str, ...]:
        """Every declared table, in first-declared order (each has one changelog)."""
        seen: dict[str, None] = {}
        for agent in self.agents:
            seen.update(dict.fromkeys(agent.tables))
        return tuple(seen)

    @property
    def uses_stream_time(self) -> bool:
        """Something here runs on stream time (windows, stream-time timers or schedules):
        the idle policy's ticks are needed, or an idle partition would never fire it."""
        return any(
            a.windows
            or any(t.type is PunctuationType.STREAM_TIME for t in a.timers)
            or any(s.type is PunctuationType.STREAM_TIME for s in a.schedules)
            for a in self.agents
        )

    @property
    def sources(self) -> list[str]:
        return sorted({s for a in self.agents for s in a.sources})

    def by_source(self) -> dict[str, tuple[Agent, ...]]:
        """Each source topic's agents, in declaration order (fan-out)."""
        out: dict[str, tuple[Agent, ...]] = {}
        for agent in self.agents:
            for source in agent.sources:
                out[source] = (*out.get(source, ()), agent)
        return out

    def runtime(self, dlq_topic: str, redact: Callable[[str], str]) -> ContextRuntime:
        agents = self.agents
        timers = {t.name: (t, KeyedTimers(t.name)) for a in agents for t in a.timers}
        windows = {w.name: (w, WindowStore(w.name, w.windows)) for a in agents for w in a.windows}
        owners = {f"t:{t.name}": a.name for a in agents for t in a.timers}
        owners.update({f"w:{w.name}": a.name for a in agents for w in a.windows})
        return ContextRuntime(self.serializer, dlq_topic, redact, timers, windows, owners)

    @staticmethod
    def _check(agents: list[Agent]) -> None:
        def unique(kind: str, names: list[str]) -> None:
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise TopologyError(f"two {kind}s named {', '.join(dupes)}")

        unique("agent", [a.name for a in agents])
        unique("timer", [t.name for a in agents for t in a.timers])
        unique("window", [w.name for a in agents for w in a.windows])
        for agent in agents:
            if not agent.sources:
                raise TopologyError(f"agent {agent.name} has no source")
            unique(f"schedule of agent {agent.name}", [s.name for s in agent.schedules])
            for sched in agent.schedules:
                if sched.interval_ms <= 0:
                    raise TopologyError(f"schedule {sched.name}: interval must be > 0 ms")
            kept = [("timer " + t.name, t.table) for t in agent.timers]
            kept += [("window " + w.name, w.table) for w in agent.windows]
            for kind, table in kept:
                if table not in agent.tables:
                    raise TopologyError(f"agent {agent.name}: {kind} keeps its state in table "
                                        f"{table!r}, which the agent does not declare")  # fmt: skip
