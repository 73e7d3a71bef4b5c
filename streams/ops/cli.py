"""The `paysaga` command line: the user's interface, so its spellings are kept stable.

Every option also reads a `PAYSAGA_*` environment variable (named in its help); an explicit
option wins over the environment, which wins over the default.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from paysaga.streams.app.settings import Settings


def _env_opt(
    p: argparse.ArgumentParser,
    flag: str,
    env: str,
    default: Any,
    typ: Callable[[str], Any] = str,
    **kw: Any,
) -> None:
    raw = os.environ.get(env)
    value = typ(raw) if raw not in (None, "") else default
    p.add_argument(flag, type=typ, default=value, help=f"{kw.pop('help', '')} [${env}]", **kw)


def _settings_opts(p: argparse.ArgumentParser, *names: str) -> None:
    """Options that map onto Settings fields; unset ones fall back to env, then default."""
    for name in names:
        field = Settings.model_fields[name]
        typ = int if field.annotation is int else str
        p.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=typ,
            default=None,
            help=f"{field.description or name} [$PAYSAGA_{name.upper()}]",
        )


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    return Settings.from_env(**overrides)


# ---- broker ---------------------------------------------------------------------------------
def _broker(args: argparse.Namespace) -> int:
    from paysaga.streams.dev.broker import BrokerError, LocalBroker

    broker = LocalBroker(Path(args.broker_data_dir), args.port)
    try:
        if args.action == "up":
            took = broker.up()
            print(f"broker up at {broker.bootstrap} in {took:.1f}s (log {broker.log_file})")
        elif args.action == "down":
            print("broker stopped" if broker.down() else "broker was not running")
        else:
            print(broker.status())
    except BrokerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


# ---- topics ---------------------------------------------------------------------------------
def _topics(args: argparse.Namespace) -> int:
    from paysaga.streams.app.topics import create_topics

    try:
        result = asyncio.run(create_topics(_settings(args)))
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    created = sorted(k for k, v in result.items() if v == "created")
    print(f"{len(result)} topics: {len(created)} created, {len(result) - len(created)} existed"
          f" (warnings above, if any)")  # fmt: skip
    for name in created:
        print(f"  + {name}")
    return 0


# ---- worker ---------------------------------------------------------------------------------
def _worker(args: argparse.Namespace) -> int:
    from paysaga.streams.app.worker import run_worker

    run_worker(_settings(args))
    return 0


# ---- produce --------------------------------------------------------------------------------
def _produce(args: argparse.Namespace) -> int:
    from paysaga.schemas.codec import AvroCodec
    from paysaga.schemas.registry import SchemaRegistry
    from paysaga.streams.app.topics import Topics
    from paysaga.streams.dev.upstream import UpstreamConfig, produce

    cfg = UpstreamConfig(
        count=args.count,
        seed=args.seed,
        duplicate_rate=args.duplicate_rate,
        conflict_rate=args.conflict_rate,
        key=args.key,
        invalid_rate=args.invalid_rate,
    )
    codec = AvroCodec(SchemaRegistry())
    settings = _settings(args)
    topic = Topics(settings.topic_prefix).initiated
    sent = asyncio.run(produce(settings.bootstrap, codec, cfg, rate=args.rate, topic=topic))
    print(f"produced {sent} PaymentInitiated events")
    return 0


# ---- simulate -------------------------------------------------------------------------------
_SIM_FLAGS: tuple[tuple[str, type, str], ...] = (
    ("approval-rate", float, "gateway: share of AUTHORIZE approved"),
    ("capture-failure-rate", float, "gateway: share of CAPTURE failed"),
    ("transient-error-rate", float, "gateway: attempts answered gateway_unavailable"),
    ("timeout-rate", float, "gateway: attempts processed but never answered"),
    ("lost-rate", float, "gateway: attempts that never reach it (an inquiry finds nothing)"),
    ("outage-every-ms", int, "gateway: an outage starts every this many ms (wall clock)"),
    ("outage-ms", int, "gateway: how long each outage lasts (every command gets a 503)"),
    ("failure-rate", float, "inventory/shipping: share of RESERVE/CREATE failed"),
    ("lag-ms", int, "bank: how long after its capture a statement line comes"),
    ("missing-rate", float, "bank: captures never on the statement"),
    ("misstated-rate", float, "bank: lines with a wrong amount"),
    ("currency-rate", float, "bank: lines in another currency"),
    ("duplicate-rate", float, "bank: lines written twice"),
    ("late-rate", float, "bank: lines coming after their window closed (--late-ms)"),
    ("late-ms", int, "bank: how long after its capture a late line comes"),
    ("unreferenced-rate", float, "bank: lines without a payment reference"),
    ("extra-rate", float, "bank: extra lines for no capture"),
    ("latency-ms", int, "simulated latency per fetched batch"),
    ("seed", int, "seed of every decision"),
)
_SIM_OPTIONS = tuple(flag.replace("-", "_") for flag, _, _ in _SIM_FLAGS)


def _simulate(args: argparse.Namespace) -> int:
    from aiokafka.errors import KafkaError

    from paysaga.streams.dev.bank import BankConfig, bank_config, run_bank_until_signalled
    from paysaga.streams.dev.simulators import SimConfig, config_for, run_until_signalled

    options = {name: getattr(args, name) for name in _SIM_OPTIONS}
    config: SimConfig | BankConfig
    try:
        config = bank_config(**options) if args.kind == "bank" else config_for(args.kind, **options)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if isinstance(config, BankConfig):
            run_bank_until_signalled(_settings(args), config)
        else:
            run_until_signalled(args.kind, _settings(args), config)
    except KafkaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


# ---- operators ------------------------------------------------------------------------------
def _get_json(settings: Settings, path: str) -> tuple[int, Any]:
    url = f"http://{settings.web_host}:{settings.web_port}{path}"
    req = urllib.request.Request(url)
    if settings.web_token:
        req.add_header("Authorization", f"Bearer {settings.web_token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _payment(args: argparse.Namespace) -> int:
    """`show`: the payment as the API shows it (GET /v1/payments/{id}); `history`: its audit
    trail from the topics, oldest first, in UTC (GET /payments/{id}/events)."""
    from urllib.parse import quote

    from paysaga.streams.ops.history import Trail, render

    settings = _settings(args)
    if args.app is not None:
        return _replayed_payment(settings, args)
    pid = quote(args.payment_id, safe="")
    path = f"/payments/{pid}/events" if args.action == "history" else f"/v1/payments/{pid}"
    code, body = _get_json(settings, path)
    if code != 200:
        print(f"error: {code} {body}", file=sys.stderr)
        return 1
    if args.action == "history":
        print(render(Trail.model_validate(body)))
    else:
        print(json.dumps(body, indent=2))
    return 0


def _replayed_payment(live: Settings, args: argparse.Namespace) -> int:
    """`payment show|history ID --app REPLAY`: the payment in a replay's state, as the API
    shows a live one, or its trail in the replay's own topics (docs/replay.md)."""
    from paysaga.domain.payment import Payment
    from paysaga.streams.ops import replay as rp
    from paysaga.streams.ops.api_models import PaymentResource
    from paysaga.streams.ops.history import render, trail

    try:
        if args.action == "history":
            print(render(asyncio.run(trail(rp.replay_settings(live, args.app), args.payment_id))))
            return 0
        raw = asyncio.run(rp.replayed_payment(live, args.app, args.payment_id))
    except rp.ReplayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if raw is None:
        print(f"error: no payment {args.payment_id} in replay {args.app}", file=sys.stderr)
        return 1
    print(PaymentResource.of(Payment.from_json(raw)).model_dump_json(indent=2))
    return 0


def _replay(args: argparse.Namespace) -> int:
    """`paysaga replay ID [...]` and `paysaga replay cleanup ID` (streams/ops/replay.py)."""
    import logging

    from paysaga.streams.ops import replay as rp

    live = _settings(args)
    logging.basicConfig(level=live.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    words = args.words
    try:
        if words[0] == "cleanup":
            if len(words) != 2:
                raise rp.ReplayError("replay cleanup needs the replay ID")
            return asyncio.run(rp.cleanup(live, words[1]))
        if len(words) != 1:
            raise rp.ReplayError("expected: paysaga replay ID [options], or replay cleanup ID")
        replay_id = words[0]
        mine = rp.replay_settings(live, replay_id)

        async def go() -> int:
            if await rp.exists(mine):
                if not args.resume:
                    raise rp.ReplayError(f"replay {replay_id} exists: --resume to finish it, "
                                         f"or `paysaga replay cleanup {replay_id}`")  # fmt: skip
                plan = rp.Plan.load(rp.state_dir(mine) / rp.PLAN_FILE)
            elif args.resume:
                raise rp.ReplayError(f"no replay {replay_id} to resume")
            else:
                plan = await rp.make_plan(
                    live, replay_id, from_offsets=args.from_offsets, from_time=args.from_time,
                    from_duration=args.from_duration, to_offsets=args.to_offsets,
                    to_time=args.to_time,
                )  # fmt: skip
            summary = await rp.run_replay(live, plan, args.verify)
            rp.print_summary(summary)
            return 0 if summary.verified in (None, True) else 3

        return asyncio.run(go())
    except (rp.ReplayError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _reset(args: argparse.Namespace) -> int:
    """`paysaga reset` (streams/ops/reset.py): 0 done, 2 refused, 3 verify differs."""
    import logging

    from paysaga.streams.ops import reset as rs

    live = _settings(args)
    logging.basicConfig(level=live.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    given = [x for x in (args.to_offsets, args.to_datetime, args.by_duration) if x is not None]
    if len(given) + args.to_earliest > 1:
        print("error: give one of --to-earliest, --to-offsets, --to-datetime and --by-duration",
              file=sys.stderr)  # fmt: skip
        return 2
    from aiokafka.errors import KafkaError

    try:
        summary = asyncio.run(rs.reset(
            live, to_offsets=args.to_offsets, to_datetime=args.to_datetime,
            by_duration=args.by_duration, force=args.force, dry_run=args.dry_run,
            verify=args.verify, discard_earlier_state=args.discard_earlier_state))  # fmt: skip
    except (ValueError, KafkaError, RuntimeError, OSError) as exc:
        # ResetError (a ValueError) says what to do; the others are Kafka or the disk
        # failing: the saved plan, if any, lets the next run finish the reset.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if summary is None:
        return 0  # a dry run
    rs.print_summary(live, summary)
    return 3 if args.verify and summary.verified is not True else 0


def _dlq(args: argparse.Namespace) -> int:
    from paysaga.streams.ops.inspection import dlq_list, dlq_show

    settings = _settings(args)
    if args.action == "redrive":
        return _redrive(args, settings)
    if args.action == "list":
        return asyncio.run(dlq_list(settings, limit=args.limit))
    return asyncio.run(dlq_show(settings, args.ref))


def _many(values: list[str] | None) -> frozenset[str]:
    """A repeatable option's values, each also a comma list."""
    return frozenset(v.strip() for value in values or () for v in value.split(",") if v.strip())


def _redrive(args: argparse.Namespace, settings: Settings) -> int:
    from aiokafka.errors import KafkaError

    from paysaga.streams.ops.redrive import Filters, Options, parse_offsets, parse_time, run_redrive

    if args.ref:
        print("error: dlq redrive takes no PARTITION:OFFSET (use --offsets)", file=sys.stderr)
        return 2
    try:
        filters = Filters(
            kinds=_many(args.kind), error_classes=_many(args.error_class),
            source_topics=_many(args.source_topic),
            since=None if args.since is None else parse_time(args.since),
            until=None if args.until is None else parse_time(args.until),
            offsets=tuple(parse_offsets(o) for o in _many(args.offsets)),
        )  # fmt: skip
        if args.max_redrives < 0 or args.rate < 0 or args.batch < 1:
            raise ValueError("--max-redrives and --rate must be >= 0, --batch >= 1")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    options = Options(filters=filters, max_redrives=args.max_redrives, rate=args.rate,
                      batch=args.batch, dry_run=args.dry_run)  # fmt: skip
    try:
        return asyncio.run(run_redrive(settings, options))
    except (KafkaError, RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # The open transaction is aborted by the next run; what was committed is in the
        # ledger, so that run continues where this one stopped.
        print("interrupted: run it again to continue", file=sys.stderr)
        return 130


def _recon(args: argparse.Namespace) -> int:
    from paysaga.streams.ops.recon_view import load, parse_window_start, render_list, render_show

    if args.action == "show":
        if len(args.window) != 3:
            print("error: recon show needs MERCHANT CURRENCY WINDOW_START", file=sys.stderr)
            return 2
        try:
            start = parse_window_start(args.window[2])
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    elif args.window:
        print("error: recon list takes no positional arguments", file=sys.stderr)
        return 2
    views = asyncio.run(load(_settings(args)))
    if args.action == "list":
        return render_list(views, sys.stdout, merchant=args.merchant, only_open=args.open,
                           limit=args.limit)  # fmt: skip
    return render_show(views, sys.stdout, args.window[0], args.window[1], start)


def _experiments(args: argparse.Namespace) -> int:
    from paysaga.streams.ops.experiments_view import load, render_report

    settings = _settings(args)
    control = args.control or settings.retry_policy().variants[0].name
    return render_report(asyncio.run(load(settings)), control, sys.stdout)


def _watch(args: argparse.Namespace) -> int:
    from paysaga.streams.ops.inspection import watch

    return asyncio.run(watch(_settings(args), seconds=args.seconds))


def _demo(args: argparse.Namespace) -> int:
    from paysaga.streams.dev.demo import run_demo

    return run_demo(
        _settings(args),
        count=args.count,
        rate=args.rate,
        port=args.broker_port,
        broker_dir=Path(args.broker_data_dir),
        outage_every_ms=args.outage_every_ms,
        outage_ms=args.outage_ms,
    )


def _worker_settings(pairs: list[str]) -> dict[str, str]:
    """`--worker-setting FIELD=VALUE` pairs, each field one of the settings' own."""
    from paysaga.streams.app.settings import Settings

    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or name not in Settings.model_fields:
            raise SystemExit(f"--worker-setting {pair!r}: expected FIELD=VALUE with a settings "
                             "field, such as engine_commit_interval_ms=100")  # fmt: skip
        if name in BENCH_OWNED:
            raise SystemExit(f"--worker-setting {name}: the bench sets it for each worker")
        out[name] = value
    return out


#: Settings the bench gives each worker itself (its broker, names, state, port, topology,
#: the whole saga's settlement batches).
BENCH_OWNED = frozenset({"bootstrap", "app_id", "topic_prefix", "input_topic_prefix",
                         "partitions", "data_dir", "web_port", "topology",
                         "settlement_batch_ms", "settlement_cutoff_ms"})  # fmt: skip


def _bench(args: argparse.Namespace) -> int:
    from paysaga.streams.dev.bench import PIPELINES, BenchOptions, run_bench

    pipelines = tuple(args.pipelines.split(",")) if args.pipelines else PIPELINES
    opts = BenchOptions(
        events=args.events, rate=args.rate, latency_seconds=args.latency_seconds,
        latency_warmup_seconds=args.latency_warmup_seconds,
        partitions=args.partitions, keys=args.keys, bootstrap=args.bench_bootstrap or None,
        results_dir=Path(args.results_dir), pipelines=pipelines,
        saga_payments=args.saga_payments, saga_workers=args.saga_workers,
        saga_upstream_key=args.saga_upstream_key,
        saga_partitions=args.saga_partitions or None,
        profile=Path(args.profile) if args.profile else None, recon_open=args.recon_open,
        retries_waiting=args.retries_waiting, views_seconds=args.views_seconds,
        views_rate=args.views_rate, worker_settings=_worker_settings(args.worker_setting),
    )  # fmt: skip
    asyncio.run(run_bench(opts))
    return 0


# ---- parser ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paysaga", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def cmd(name: str, fn: Callable[[argparse.Namespace], int], help: str) -> Any:
        p = sub.add_parser(name, help=help)
        p.set_defaults(fn=fn)
        return p

    def broker_opts(p: argparse.ArgumentParser, prefix: str = "") -> None:
        _env_opt(p, f"--{prefix}port", "PAYSAGA_BROKER_PORT", 9092, int, help="broker port")
        _env_opt(
            p,
            f"--{prefix}data-dir",
            "PAYSAGA_BROKER_DATA_DIR",
            "data/broker",
            dest="broker_data_dir",
            help="broker data directory",
        )

    p = cmd("broker", _broker, "the local Apache Kafka node (KRaft, loopback)")
    p.add_argument("action", choices=("up", "down", "status"))
    broker_opts(p)

    p = cmd("topics", _topics, "create every topic, idempotently")
    p.add_argument("action", choices=("create",))
    _settings_opts(p, "bootstrap", "topic_prefix", "partitions", "replication_factor", "app_id")

    p = cmd("worker", _worker, "run one paysaga worker")
    _settings_opts(
        p,
        "bootstrap",
        "topic_prefix",
        "data_dir",
        "web_port",
        "web_host",
        "app_id",
        "partitions",
        "log_level",
    )

    p = cmd("produce", _produce, "the upstream producer simulator (Avro PaymentInitiated)")
    _settings_opts(p, "bootstrap", "topic_prefix")
    _env_opt(p, "--count", "PAYSAGA_COUNT", 1000, int, help="events to send")
    _env_opt(p, "--rate", "PAYSAGA_RATE", 0.0, float, help="events/s, 0 = unthrottled")
    _env_opt(p, "--seed", "PAYSAGA_SEED", 42, int, help="random seed")
    _env_opt(p, "--duplicate-rate", "PAYSAGA_DUPLICATE_RATE", 0.05, float, help="retries")
    _env_opt(p, "--conflict-rate", "PAYSAGA_CONFLICT_RATE", 0.01, float, help="key reuse")
    _env_opt(p, "--invalid-rate", "PAYSAGA_INVALID_RATE", 0.0, float,
             help="requests with a non-ISO 4217 currency (bad input: the DLQ)")  # fmt: skip
    _env_opt(p, "--key", "PAYSAGA_UPSTREAM_KEY", "payment", str, choices=("payment", "scope"),
             help="record key: payment_id, or idempotency scope (no repartition hop)")  # fmt: skip

    what = "an outside service: card gateway, inventory, shipping or the bank's statement feed"
    p = cmd("simulate", _simulate, what)
    p.add_argument("kind", choices=("gateway", "inventory", "shipping", "bank"))
    _settings_opts(p, "bootstrap", "topic_prefix", "partitions")
    # Unset options (None) take the service config's default; each applies to its services.
    for flag, typ, what in _SIM_FLAGS:
        env = "PAYSAGA_SIM_" + flag.replace("-", "_").upper()
        _env_opt(p, "--" + flag, env, None, typ, help=f"{what} (default: the service's)")

    p = cmd("payment", _payment, "show a payment or its history (through the web views)")
    p.add_argument("action", choices=("show", "history"))
    p.add_argument("payment_id")
    p.add_argument("--app", metavar="REPLAY_ID",
                   help="from a replay's state and topics instead of the live views")  # fmt: skip
    _settings_opts(p, "web_host", "web_port", "web_token", "bootstrap", "app_id",
                   "topic_prefix", "data_dir", "partitions")  # fmt: skip

    p = cmd("replay", _replay, "re-execute the live history into an isolated application "
            "(docs/replay.md): replay ID [options], or replay cleanup ID")  # fmt: skip
    p.add_argument("words", nargs="+", metavar="ID | cleanup ID")
    p.add_argument("--from-offsets", help="topic:partition:offset,... to start at")
    p.add_argument("--from-time", help="start at this time (ISO 8601 or epoch ms)")
    p.add_argument("--from-duration", help="start this long ago (ISO 8601: P1D, PT6H)")
    p.add_argument("--to-offsets", help="topic:partition:offset,... to stop before")
    p.add_argument("--to-time", help="stop after this time (default: the end as of now)")
    p.add_argument("--verify", action="store_true",
                   help="compare the replayed payments table with the live one")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="finish a replay that was stopped")
    _settings_opts(p, "bootstrap", "app_id", "topic_prefix", "data_dir", "partitions")

    p = cmd("reset", _reset, "rebuild the live application's state from its recorded history "
            "(docs/replay.md#reset); stop every worker first")  # fmt: skip
    p.add_argument("--to-earliest", action="store_true", help="from the start (the default)")
    p.add_argument("--to-offsets", help="topic:partition:offset,... to start at")
    p.add_argument("--to-datetime", help="start at this time (ISO 8601 or epoch ms)")
    p.add_argument("--by-duration", help="start this long ago (ISO 8601: P1D, PT6H)")
    p.add_argument("--force", action="store_true",
                   help="remove the group's members (workers that died within their session "
                        "timeout)")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="print every action, change nothing")
    p.add_argument(
        "--verify",
        action="store_true",
        help="compare the rebuilt payments table with the one it replaces",
    )
    p.add_argument(
        "--discard-earlier-state",
        action="store_true",
        help="from a later position: start the state over there, losing what came before",
    )
    _settings_opts(p, "bootstrap", "app_id", "topic_prefix", "data_dir", "partitions")

    p = cmd("dlq", _dlq, "inspect the dead-letter queue, redrive its letters")
    p.add_argument("action", choices=("list", "show", "redrive"))
    p.add_argument("ref", nargs="?", help="PARTITION:OFFSET for show")
    _env_opt(p, "--limit", "PAYSAGA_DLQ_LIMIT", 50, int, help="rows to list")
    _settings_opts(p, "bootstrap", "topic_prefix")
    r = p.add_argument_group("redrive (docs/dlq.md); filters repeat, or take comma lists")
    r.add_argument("--kind", action="append", help="only letters of this error kind")
    r.add_argument("--error-class", action="append",
                   help="only this class: transient, unknown, permanent")  # fmt: skip
    r.add_argument("--since", help="last failure at or after (epoch ms or ISO 8601, UTC)")
    r.add_argument("--until", help="last failure before (epoch ms or ISO 8601, UTC)")
    r.add_argument("--source-topic", action="append", help="only letters from this topic")
    r.add_argument("--offsets", action="append", metavar="P:FROM-TO",
                   help="only these DLQ offsets (inclusive; P:FROM- to the end)")  # fmt: skip
    _env_opt(p, "--max-redrives", "PAYSAGA_REDRIVE_MAX_REDRIVES", 3, int,
             help="redrive: a letter redriven this many times is quarantined")  # fmt: skip
    _env_opt(p, "--rate", "PAYSAGA_REDRIVE_RATE", 100.0, float,
             help="redrive: letters/s, 0 = no limit")  # fmt: skip
    _env_opt(p, "--batch", "PAYSAGA_REDRIVE_BATCH", 50, int,
             help="redrive: letters per transaction at most")  # fmt: skip
    r.add_argument("--dry-run", action="store_true", help="print what would be done, send nothing")

    p = cmd("recon", _recon, "reconciliation windows, from the committed report topics")
    p.add_argument("action", choices=("list", "show"))
    p.add_argument("window", nargs="*", help="show: MERCHANT CURRENCY WINDOW_START "
                                             "(epoch ms or ISO 8601, UTC)")  # fmt: skip
    p.add_argument("--merchant", help="list: only this merchant")
    p.add_argument("--open", action="store_true", help="list: only windows with open problems")
    _env_opt(p, "--limit", "PAYSAGA_RECON_LIMIT", 50, int, help="list: rows (the latest)")
    _settings_opts(p, "bootstrap", "topic_prefix")

    p = cmd("experiments", _experiments, "the A/B retry strategies compared (docs/retries.md)")
    p.add_argument("action", choices=("report",))
    p.add_argument("--control", help="the variant compared against (default: the first "
                                      "configured, CONTROL)")  # fmt: skip
    _settings_opts(p, "bootstrap", "topic_prefix", "app_id", "retry_variants")

    p = cmd("watch", _watch, "live counts of payment.status outcomes and the DLQ")
    _settings_opts(p, "bootstrap", "topic_prefix")
    _env_opt(p, "--seconds", "PAYSAGA_WATCH_SECONDS", 0.0, float, help="0 = until Ctrl-C")

    p = cmd("bench", _bench, "benchmark: baseline loop vs textbook Faust vs paysaga")
    _env_opt(p, "--events", "PAYSAGA_BENCH_EVENTS", 50_000, int, help="data set size")
    _env_opt(p, "--rate", "PAYSAGA_BENCH_RATE", 1000.0, float, help="offered rate for latency")
    _env_opt(p, "--latency-seconds", "PAYSAGA_BENCH_LATENCY_SECONDS", 10.0, float,
             help="duration of the latency phase")  # fmt: skip
    _env_opt(p, "--latency-warmup-seconds", "PAYSAGA_BENCH_LATENCY_WARMUP_SECONDS", 3.0, float,
             help="seconds at the offered rate before latency is measured")  # fmt: skip
    _env_opt(p, "--partitions", "PAYSAGA_BENCH_PARTITIONS", 3, int, help="input partitions")
    _env_opt(p, "--keys", "PAYSAGA_BENCH_KEYS", 200_000, int,
             help="changelog keys for restore/restart (0 skips)")  # fmt: skip
    _env_opt(p, "--bootstrap", "PAYSAGA_BENCH_BOOTSTRAP", "", str, dest="bench_bootstrap",
             help="use this broker instead of starting one")  # fmt: skip
    _env_opt(p, "--pipelines", "PAYSAGA_BENCH_PIPELINES", "", str,
             help="comma list of baseline,faust,paysaga")  # fmt: skip
    _env_opt(p, "--saga-payments", "PAYSAGA_BENCH_SAGA_PAYMENTS", 10_000, int,
             help="whole-saga backlog size (0 skips the whole saga)")  # fmt: skip
    _env_opt(p, "--saga-workers", "PAYSAGA_BENCH_SAGA_WORKERS", 1, int,
             help="whole saga: worker processes")  # fmt: skip
    _env_opt(p, "--saga-partitions", "PAYSAGA_BENCH_SAGA_PARTITIONS", 0, int,
             help="whole saga: partitions (0: --partitions)")  # fmt: skip
    _env_opt(p, "--saga-upstream-key", "PAYSAGA_BENCH_SAGA_UPSTREAM_KEY", "payment", str,
             choices=("payment", "scope"),
             help="whole saga: how upstream keys requests (scope: no repartition hop)")  # fmt: skip
    _env_opt(p, "--profile", "PAYSAGA_BENCH_PROFILE", "", str,
             help="where py-spy samples of the whole-saga worker go (backlog)")  # fmt: skip
    _env_opt(p, "--recon-open", "PAYSAGA_BENCH_RECON_OPEN", 0, int,
             help="captures held open in reconciliation, for its memory (0 skips)")  # fmt: skip
    _env_opt(p, "--retries-waiting", "PAYSAGA_BENCH_RETRIES_WAITING", 0, int,
             help="payments with a retry scheduled at once, for its memory (0 skips)")  # fmt: skip
    _env_opt(p, "--views-seconds", "PAYSAGA_BENCH_VIEWS_SECONDS", 0.0, float,
             help="seconds of payment views asked of two workers under load (0 skips)")  # fmt: skip
    _env_opt(p, "--views-rate", "PAYSAGA_BENCH_VIEWS_RATE", 500.0, float,
             help="payments/s offered while the views are asked")  # fmt: skip
    p.add_argument("--worker-setting", action="append", default=[], metavar="FIELD=VALUE",
                   help="a setting every bench worker runs with (repeatable), e.g. "
                   "engine_commit_interval_ms=0")  # fmt: skip
    _env_opt(p, "--results-dir", "PAYSAGA_BENCH_RESULTS", "bench/results", str,
             help="where JSON results go")  # fmt: skip

    p = cmd("demo", _demo, "broker + topics + worker + producer + live progress (make run)")
    _settings_opts(p, "data_dir", "web_port", "partitions")
    _env_opt(p, "--count", "PAYSAGA_COUNT", 50_000, int, help="events to produce")
    _env_opt(p, "--rate", "PAYSAGA_RATE", 500.0, float, help="events/s")
    _env_opt(p, "--outage-every-ms", "PAYSAGA_DEMO_OUTAGE_EVERY_MS", 120_000, int,
             help="the gateway simulator's outages start this often (wall clock)")  # fmt: skip
    _env_opt(p, "--outage-ms", "PAYSAGA_DEMO_OUTAGE_MS", 20_000, int,
             help="each gateway outage lasts this long (0: no outage)")  # fmt: skip
    broker_opts(p, prefix="broker-")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "dlq" and args.action == "show" and not args.ref:
        print("error: dlq show needs PARTITION:OFFSET", file=sys.stderr)
        return 2
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
