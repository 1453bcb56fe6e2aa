"""The ``fedmq`` command line: a thin click layer over the settings dataclasses.

Every command turns a :class:`~shared.errors.FedmqError` into one line on stderr and exit
code 1 (2 for usage errors, as click does); tracebacks are for bugs only. The options of
``aggregator`` and ``run`` that configure the aggregator are generated from
:class:`fedmq.aggregator.config.AggregatorConfig` by :mod:`fedmq.options`, the one list of them.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

import click
from click.core import ParameterSource

from fedmq.broker.settings import DEFAULT_AMQP_URL
from fedmq.options import (
    ConfigCommand,
    FlagEnvOption,
    aggregator_config,
    aggregator_params,
    broker_from,
    broker_options,
    config_option,
    logging_options,
    mask_secrets,
    parse_label_column,
)
from fedmq.shared import lanes
from fedmq.shared.chunking import DEFAULT_CHUNK_BYTES, MIN_CHUNK_BYTES
from fedmq.shared.defaults import ATTACK_KINDS, DEFAULT_ATTACK_SCALE, DEFAULT_TRAINER
from fedmq.shared.errors import FedmqError
from fedmq.shared.logs import setup_logging

log = logging.getLogger("fedmq.cli")


def fails_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Report a FedmqError as one line (URL passwords masked) and exit with its code (1; 2 for a refusal)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FedmqError as exc:
            click.echo(f"fedmq: error: {mask_secrets(str(exc))}", err=True)
            sys.exit(exc.exit_code)

    return wrapper


def on_signals(handler: Callable[[], None]) -> None:
    """Call ``handler`` on SIGTERM and SIGINT (the second SIGINT interrupts for real)."""

    def _handle(signum: int, _frame: Any) -> None:
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        handler()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _handle)
        signal.signal(signal.SIGINT, _handle)


BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


@click.group(context_settings={"auto_envvar_prefix": "FEDMQ", "help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fedmq")
@click.pass_context
@fails_cleanly
def main(ctx: click.Context) -> None:
    """fedmq: federated learning over RabbitMQ (FedAvg, FedAsync, FedBuff)."""
    lanes.configure(os.environ.get("FEDMQ_LANES"))  # threads for large numpy loops (fedmq/shared/lanes.py)
    if ctx.invoked_subcommand in ("aggregator", "run", "workers"):
        # Before numpy loads: an idle BLAS pool spins between the aggregator's small matrix
        # products and steals the cores the workers need (measured 3-6x the CPU per update).
        # `run` passes this on to the processes it starts. Set the variables to override.
        for var in BLAS_THREAD_VARS:
            os.environ.setdefault(var, "1")


# ====================================================================== data
@main.group()
def data() -> None:
    """Prepare datasets: split one into per-worker shards."""


@data.command("split")
@config_option
@click.option("--dataset", help="Built-in dataset: digits, breast_cancer, wine, iris, xor.")
@click.option("--data", "data_file", cls=FlagEnvOption, type=click.Path(dir_okay=False), help="Your own .npz or .csv file.")
@click.option("--label-column", default=None, help="CSV label column: a header name or an index (0 = first; default: the last).")
@click.option("--workers", type=click.IntRange(min=1), required=True, help="Number of shards.")
@click.option("--partition", type=click.Choice(["iid", "dirichlet", "shards"]), default="iid", show_default=True)
@click.option("--alpha", type=float, default=0.5, show_default=True, help="Dirichlet concentration.")
@click.option("--shards-per-worker", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--test-fraction", type=float, default=0.2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--scale", type=click.Choice(["central", "per-shard"]), default="central", show_default=True,
              help="central: every shard scaled with the whole training set's statistics (a simulation); "
                   "per-shard: each shard standardised with its own, as independent sites would.")
@click.option("--image", is_flag=True, help="Keep a built-in image set as images (digits: N x 1 x 8 x 8) for convolutional models.")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Directory to write the shards to.")
@logging_options
@fails_cleanly
def data_split(dataset: str | None, data_file: str | None, label_column: str | None, workers: int, partition: str,
               alpha: float, shards_per_worker: int, test_fraction: float, seed: int, scale: str, image: bool,
               out: str, log_level: str, log_format: str) -> None:
    """Split a dataset into worker-<i>.npz shards, test.npz and manifest.json."""
    setup_logging(log_level, log_format)
    from fedmq.shared.data import load_dataset
    from fedmq.shared.split import format_table, split_dataset

    if bool(dataset) == bool(data_file):
        raise click.UsageError("give exactly one of --dataset NAME or --data FILE")
    check_label_column(label_column, data_file)
    column = parse_label_column(label_column, data_file)
    ds = load_dataset(dataset, data_file, test_fraction=test_fraction, seed=seed, label_column=column, image=image)
    manifest = split_dataset(ds, out, num_workers=workers, method=partition, alpha=alpha,
                             shards_per_worker=shards_per_worker, seed=seed, scale=scale)
    click.echo(format_table(manifest))
    click.echo(f"wrote {workers} shards, test.npz and manifest.json to {out}")


def check_label_column(label_column: str | None, data_file: str | None) -> None:
    """--label-column chooses a column of a CSV: with anything else it is a usage error."""
    if label_column is not None and not (data_file and data_file.lower().endswith(".csv")):
        raise click.UsageError("--label-column applies to a .csv file given with --data")


# ====================================================================== broker
@main.group()
def broker() -> None:
    """List the namespaces on RabbitMQ; declare, inspect and clean one."""


def _admin(amqp_url: str, namespace: str) -> Any:
    from fedmq.broker.admin import Admin

    settings, topology = broker_from(amqp_url, namespace)
    return Admin(settings, topology)


@broker.command("setup")
@broker_options
@logging_options
@fails_cleanly
def broker_setup(amqp_url: str, namespace: str, log_level: str, log_format: str) -> None:
    """Declare the namespace's streams, queues and exchanges (idempotent)."""
    setup_logging(log_level, log_format)
    with _admin(amqp_url, namespace) as admin:
        admin.setup()
        click.echo(f"namespace {namespace!r} declared: " + ", ".join(admin.topology.queues))


@broker.command("list")
@click.option("--amqp-url", default=DEFAULT_AMQP_URL, envvar="FEDMQ_AMQP_URL", show_default=True,
              help="RabbitMQ URL (amqp:// or amqps://); its vhost is the one listed.")
@click.option("--management-url", default=None, envvar="FEDMQ_MANAGEMENT_URL",
              help="The management HTTP API (default: http://<the AMQP host>:15672).")
@click.option("--json", "as_json", cls=FlagEnvOption, is_flag=True, help="Print JSON instead of a table.")
@logging_options
@fails_cleanly
def broker_list(amqp_url: str, management_url: str | None, as_json: bool, log_level: str, log_format: str) -> None:
    """The fedmq namespaces on the broker: every prefix <ns> of queues named <ns>.models,
    <ns>.tasks, <ns>.updates, ... (from the management API, or a local rabbitmqctl)."""
    setup_logging(log_level, log_format)
    from fedmq.broker.admin import as_json as rows_json
    from fedmq.broker.admin import list_namespaces
    from fedmq.broker.settings import BrokerSettings

    found, source = list_namespaces(BrokerSettings.from_url(amqp_url), management_url)
    if as_json:
        click.echo(json.dumps({"source": source, "namespaces": rows_json(found)}, indent=2))
        return
    if not found:
        click.echo(f"no fedmq namespace on this broker (listed with {source})")
        return
    width = max(9, *(len(n.namespace) for n in found))
    click.echo(f"{'namespace':<{width}}  {'queues':>6}  {'messages':>8}  {'consumers':>9}")
    for n in found:
        total = len(n.queues) + len(n.missing)
        partial = f"  (missing: {', '.join(q[len(n.namespace) + 1:] for q in n.missing)})" if n.missing else ""
        click.echo(f"{n.namespace:<{width}}  {len(n.queues):>2}/{total:<3}  {n.messages:>8}  {n.consumers:>9}{partial}")
    click.echo(f"{len(found)} namespace(s), listed with {source}")


@broker.command("status")
@broker_options
@click.option("--json", "as_json", cls=FlagEnvOption, is_flag=True, help="Print JSON instead of a table.")
@click.option("--window", type=float, default=120.0, show_default=True, help="Seconds of worker presence to show.")
@logging_options
@fails_cleanly
def broker_status(amqp_url: str, namespace: str, as_json: bool, window: float, log_level: str, log_format: str) -> None:
    """Queues (ready, unacked, consumers), dead-lettered counts and workers heard from."""
    setup_logging(log_level, log_format)
    from fedmq.broker.admin import as_json as rows_json

    with _admin(amqp_url, namespace) as admin:
        queues = admin.queue_status()
        workers = admin.workers_seen(window_s=window)
        dlq = {q.name: q.ready for q in queues if q.name in admin.topology.dead_letter_queues.values()}
    if as_json:
        click.echo(json.dumps({"namespace": namespace, "queues": rows_json(queues),
                               "dead_lettered": dlq, "workers": rows_json(workers)}, indent=2))
        return
    click.echo(f"namespace {namespace}")
    click.echo(f"  {'queue':<32} {'type':<8} {'ready':>7} {'unacked':>8} {'consumers':>9}")
    for q in queues:
        if not q.exists:
            click.echo(f"  {q.name:<32} (not declared: run `fedmq broker setup`)")
            continue
        ready = "-" if q.ready is None else str(q.ready)
        unacked = "-" if q.unacked is None else str(q.unacked)
        click.echo(f"  {q.name:<32} {q.kind:<8} {ready:>7} {unacked:>8} {q.consumers!s:>9}")
    click.echo("  dead-lettered: " + ", ".join(f"{k} {v}" for k, v in dlq.items()))
    if workers:
        click.echo(f"  workers heard from in the last {window:.0f} s:")
        for w in workers:
            click.echo(f"    {w.worker_id:<24} {w.last_kind:<10} {w.last_seen_s_ago:>6.1f} s ago")
    else:
        click.echo(f"  no worker heard from in the last {window:.0f} s")


@broker.command("dlq")
@broker_options
@click.option("--show", is_flag=True, help="List dead-lettered messages with their reasons.")
@click.option("--purge", is_flag=True, help="Delete every dead-lettered message.")
@click.option("--limit", type=click.IntRange(min=0), default=1000, show_default=True,
              help="--show: list at most this many messages per dead-letter queue.")
@click.option("--json", "as_json", cls=FlagEnvOption, is_flag=True)
@logging_options
@fails_cleanly
def broker_dlq(amqp_url: str, namespace: str, show: bool, purge: bool, limit: int, as_json: bool, log_level: str,
               log_format: str) -> None:
    """Inspect or empty the dead-letter queues."""
    setup_logging(log_level, log_format)
    from fedmq.broker.admin import as_json as rows_json

    if not (show or purge):
        show = True
    with _admin(amqp_url, namespace) as admin:
        if show:
            # the true depth, read before listing (listing holds messages unacked meanwhile)
            dlqs = set(admin.topology.dead_letter_queues.values())
            depth = {q.name: q.ready or 0 for q in admin.queue_status() if q.name in dlqs and q.exists}
            rows = admin.dead_letters(limit=limit)
            total = max(sum(depth.values()), len(rows))
            if as_json:
                click.echo(json.dumps({"total": total, "by_queue": depth, "shown": len(rows),
                                       "messages": rows_json(rows)}, indent=2))
            else:
                more = f" (showing {len(rows)}: at most {limit} per queue, see --limit)" if len(rows) < total else ""
                click.echo(f"{total} dead-lettered message(s){more}")
                for r in rows:
                    detail = f": {r.detail}" if r.detail else ""
                    click.echo(f"  {r.queue}  {r.message_id or '-'}  {r.reason}{detail}")
        if purge:
            counts = admin.purge_dead_letters()
            click.echo("purged " + ", ".join(f"{n} from {q}" for q, n in counts.items()))


@broker.command("delete")
@broker_options
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@logging_options
@fails_cleanly
def broker_delete(amqp_url: str, namespace: str, yes: bool, log_level: str, log_format: str) -> None:
    """Delete every queue and exchange of the namespace (streams hold disk)."""
    setup_logging(log_level, log_format)
    from fedmq.broker.settings import mask_url

    with _admin(amqp_url, namespace) as admin:
        existing = [q.name for q in admin.queue_status() if q.exists]
        if not existing:
            admin.delete()  # stray exchanges, if any
            click.echo(f"namespace {namespace!r} does not exist on {mask_url(amqp_url)}: nothing to delete")
            return
        if not yes and not click.confirm(f"delete namespace {namespace!r} ({len(existing)} queues)?"):
            return
        admin.delete()
    click.echo(f"namespace {namespace!r} deleted ({len(existing)} queues)")


# ====================================================================== keys
@main.group()
def keys() -> None:
    """End-to-end signatures: make Ed25519 key pairs for the aggregator and the workers."""


@keys.command("generate")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Directory to write the keys to.")
@click.option("--id", "key_ids", cls=FlagEnvOption, multiple=True, required=True,
              help="Whose key: a worker id, or `aggregator`; repeat for several.")
@fails_cleanly
def keys_generate(out: str, key_ids: tuple[str, ...]) -> None:
    """Write OUT/<id>.key (private, PEM PKCS#8, mode 0600) and OUT/<id>.pub (public, PEM) for
    each --id; a directory of <worker id>.pub files is what `fedmq aggregator --worker-keys` reads."""
    from fedmq.shared.signing import check_key_id, write_key_pair

    for key_id in key_ids:
        check_key_id(key_id)  # every id checked before any key is written
    for key_id in key_ids:
        private, public = write_key_pair(out, key_id)
        click.echo(f"{key_id}: private key {private} (keep it secret), public key {public}")


# ====================================================================== worker
def worker_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--aggregator-key", type=click.Path(dir_okay=False), default=None,
                      help="The aggregator's public key (PEM, `fedmq keys generate`): accept only models, "
                           "tasks and stops it signed; others are skipped or dead-lettered.")(fn)
    fn = click.option("--chunk-bytes", type=click.IntRange(min=MIN_CHUNK_BYTES), default=DEFAULT_CHUNK_BYTES,
                      show_default=True,
                      help="Updates larger than this travel as chunks of this many bytes (RabbitMQ 4 refuses "
                           "messages over 16 MiB by default).")(fn)
    fn = click.option("--consumer-timeout", type=click.FloatRange(min=1), default=86400.0, show_default=True,
                      help="Seconds RabbitMQ (3.12+, 4.x) lets a task stay unacked while it trains "
                           "(x-consumer-timeout; the broker's default is 30 min).")(fn)
    fn = click.option("--max-model-bytes", type=click.IntRange(min=1), default=2 * 1024**3, show_default=True,
                      help="Skip model versions larger than this (a chunked one before anything is allocated).")(fn)
    fn = click.option("--trainer", default=DEFAULT_TRAINER, show_default=True,
                      help="Trainer factory MODULE:ATTR (see README, 'Bring your own model').")(fn)
    fn = click.option("--slowdown", type=click.FloatRange(min=1.0), default=1.0, show_default=True,
                      help="Be F times slower than the real training (straggler simulation).")(fn)
    fn = click.option("--heartbeat", type=click.FloatRange(min=0.5), default=5.0, show_default=True,
                      help="Seconds between presence heartbeats.")(fn)
    fn = click.option("--failure-backoff", type=click.FloatRange(min=0), default=1.0, show_default=True,
                      help="Seconds to pause after a trainer failure (doubling up to 32x).")(fn)
    fn = click.option("--amqp-heartbeat", type=click.IntRange(min=1), default=30, show_default=True,
                      help="AMQP connection heartbeat in seconds.")(fn)
    fn = click.option("--attack-scale", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_ATTACK_SCALE,
                      show_default=True, help="--attack: S (sign-flip sends -S x delta, scale S x delta, gauss N(0, S^2) values).")(fn)
    fn = click.option("--serve", is_flag=True, default=False,
                      help="After a run's stop, wait for the next run instead of exiting; stop with SIGTERM/SIGINT.")(fn)
    return fn


@main.command()
@config_option
@click.option("--data", "data_file", cls=FlagEnvOption, type=click.Path(dir_okay=False), required=True,
              help="This worker's shard (.npz with X, y).")
@click.option("--worker-id", default=None, help="Stable id (default: host-pid). Reuse it when restarting a worker.")
@click.option("--declare/--no-declare", default=True, show_default=True,
              help="Declare the namespace's queues on connect (--no-declare: a least-privilege user).")
@click.option("--trust-user", default=None,
              help="Accept models, tasks and stop only when RabbitMQ vouches they come from this user "
                   "(the aggregator's); others are ignored or dead-lettered.")
@click.option("--signing-key", type=click.Path(dir_okay=False), default=None,
              help="This worker's private key (PEM, `fedmq keys generate --id WORKER_ID`): sign its updates, "
                   "reports and presence, for an aggregator started with --worker-keys.")
@click.option("--attack", type=click.Choice(ATTACK_KINDS), default=None,
              help="Poison this worker's updates (tests, benchmarks, research); see README, 'Hostile participants'.")
@click.option("--memory-budget", default="auto", show_default=True,
              help="Refuse a run whose model this worker cannot hold (3x the model besides the trainer): a size "
                   "(8G, 512M), auto (the memory available to it) or off.")
@worker_options
@broker_options
@logging_options
@fails_cleanly
def worker(data_file: str, worker_id: str | None, declare: bool, trust_user: str | None, signing_key: str | None,
           aggregator_key: str | None, attack: str | None, memory_budget: str, trainer: str, slowdown: float, heartbeat: float,
           failure_backoff: float, amqp_heartbeat: int, attack_scale: float, serve: bool, amqp_url: str, namespace: str,
           log_level: str, log_format: str, chunk_bytes: int, max_model_bytes: int,
           consumer_timeout: float) -> None:
    """Train on a local shard for the federation."""
    setup_logging(log_level, log_format)
    from fedmq.worker.service import Worker, WorkerConfig, default_worker_id

    settings, topology = broker_from(amqp_url, namespace, heartbeat_s=amqp_heartbeat)
    cfg = WorkerConfig(data=data_file, worker_id=worker_id or default_worker_id(), slowdown=slowdown,
                       trainer=trainer, heartbeat_s=heartbeat, failure_backoff_s=failure_backoff, declare=declare,
                       trust_user=trust_user, serve=serve, signing_key=signing_key, aggregator_key=aggregator_key,
                       attack=attack, attack_scale=attack_scale, chunk_bytes=chunk_bytes,
                       max_model_bytes=max_model_bytes, consumer_timeout_s=consumer_timeout,
                       memory_budget=memory_budget)
    w = Worker(cfg, settings, topology)
    on_signals(w.request_stop)
    sys.exit(w.run())


@main.command()
@config_option
@click.option("--shards", type=click.Path(file_okay=False, exists=True), required=True,
              help="Directory written by `fedmq data split`: one worker per worker-<i>.npz.")
@click.option("--count", type=click.IntRange(min=1), default=None, help="Run only the first N shards.")
@click.option("--id-prefix", default="w", show_default=True, help="Worker ids are <prefix><i>.")
@click.option("--processes", type=click.IntRange(min=1), default=None,
              help="Processes hosting the workers (default: one per 64 workers, at most 16); each runs its "
                   "share as threads with one heartbeat thread.")
@click.option("--slow", type=click.IntRange(min=0), default=0, show_default=True,
              help="Make the last N workers stragglers (with --slowdown).")
@click.option("--signing-keys", type=click.Path(file_okay=False, exists=True), default=None,
              help="Directory of <worker id>.key private keys: each worker signs with its own.")
@click.option("--attackers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Make the first N workers attack (with --attack).")
@click.option("--attack", type=click.Choice(ATTACK_KINDS), default=None, help="The attack of --attackers.")
@worker_options
@broker_options
@logging_options
@fails_cleanly
def workers(shards: str, count: int | None, id_prefix: str, processes: int | None, slow: int, signing_keys: str | None,
            aggregator_key: str | None, attackers: int, attack: str | None, trainer: str, slowdown: float,
            heartbeat: float, failure_backoff: float, amqp_heartbeat: int, attack_scale: float, serve: bool,
            amqp_url: str, namespace: str, log_level: str, log_format: str, chunk_bytes: int,
            max_model_bytes: int, consumer_timeout: float) -> None:
    """Run many workers on this machine: threads in a few processes, each with its own connection."""
    setup_logging(log_level, log_format)
    from fedmq.worker.pool import run_pool

    settings, topology = broker_from(amqp_url, namespace, heartbeat_s=amqp_heartbeat)
    stop = threading.Event()
    on_signals(stop.set)
    sys.exit(run_pool(shards, settings, topology, stop=stop, count=count, processes=processes,
                      setup_logging=partial(setup_logging, log_level, log_format), id_prefix=id_prefix,
                      trainer=trainer, slowdown=slowdown, slow=slow, heartbeat_s=heartbeat, serve=serve,
                      failure_backoff_s=failure_backoff,
                      signing_keys=signing_keys, aggregator_key=aggregator_key,
                      attackers=attackers, attack=attack, attack_scale=attack_scale,
                      chunk_bytes=chunk_bytes, max_model_bytes=max_model_bytes, consumer_timeout_s=consumer_timeout))


# ====================================================================== aggregator
@main.command(cls=ConfigCommand, config_params=partial(aggregator_params, "aggregator"))
@config_option
@broker_options
@logging_options
@fails_cleanly
def aggregator(amqp_url: str, namespace: str, log_level: str, log_format: str, **fields: Any) -> None:
    """Coordinate the federation: publish versions and tasks, aggregate, evaluate, checkpoint."""
    setup_logging(log_level, log_format)
    from fedmq.aggregator.service import Aggregator

    cfg = aggregator_config(fields)
    settings, topology = broker_from(amqp_url, namespace)
    agg = Aggregator(cfg, settings, topology)
    on_signals(agg.request_stop)
    final = agg.run()
    click.echo(json.dumps(final), err=False)
    sys.exit(130 if final.get("interrupted") else 0)


# ====================================================================== run and plot
@main.command(cls=ConfigCommand, config_params=partial(aggregator_params, "run"))
@config_option
@click.option("--workers", "num_workers", cls=FlagEnvOption, type=click.IntRange(min=1), default=4, show_default=True,
              help="Worker processes to start.")
@click.option("--dataset", default=None, help="Built-in dataset (default digits when --data is not given).")
@click.option("--data", "data_file", cls=FlagEnvOption, type=click.Path(dir_okay=False), default=None,
              help="Your own .npz or .csv file.")
@click.option("--label-column", default=None, help="CSV label column: a header name or an index (0 = first; default: the last).")
@click.option("--partition", type=click.Choice(["iid", "dirichlet", "shards"]), default="dirichlet", show_default=True)
@click.option("--alpha", type=float, default=0.5, show_default=True)
@click.option("--shards-per-worker", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--image", is_flag=True, help="Keep a built-in image set as images (digits: N x 1 x 8 x 8) for convolutional models.")
@click.option("--slow-workers", type=click.FloatRange(0, 1), default=0.0, show_default=True, help="Fraction of stragglers.")
@click.option("--slowdown", type=click.FloatRange(min=1), default=10.0, show_default=True, help="How much slower stragglers are.")
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Run directory (with --resume: the previous run's, continued).")
@click.option("--in-process-workers", is_flag=True, help="Host the workers as threads of one process.")
@click.option("--sign", is_flag=True,
              help="End-to-end signatures: make a throwaway key pair for the aggregator and each worker in "
                   "RUN_DIR/keys; the aggregator signs models, tasks and stops and accepts only updates its "
                   "workers signed, the workers the reverse.")
@click.option("--attackers", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Fraction of the workers that attack (with --attack); the aggregator is not told which.")
@click.option("--attack", type=click.Choice(ATTACK_KINDS), default=None, help="The attack of --attackers.")
@click.option("--attack-scale", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_ATTACK_SCALE,
              show_default=True, help="--attack: S (sign-flip sends -S x delta, scale S x delta, gauss N(0, S^2)).")
@click.option("--display", type=click.Choice(["auto", "live", "plain"]), default="auto", show_default=True)
@broker_options
@logging_options
@fails_cleanly
def run(**options: Any) -> None:
    """Run a whole federation on this machine: split, broker, aggregator, workers, plot."""
    from fedmq.runner import run_federation

    check_label_column(options["label_column"], options["data_file"])
    source = click.get_current_context().get_parameter_source("namespace")
    namespace_given = source not in (None, ParameterSource.DEFAULT)
    sys.exit(run_federation(options, namespace_given=namespace_given))


@main.command()
@click.argument("run_dir", required=False, type=click.Path(file_okay=False))
@click.option("-f", "--follow", is_flag=True,
              help="Refresh whenever the run's files change, until it finishes (or Ctrl-C).")
@click.option("--json", "as_json", cls=FlagEnvOption, is_flag=True, help="One JSON document (with --follow: one per line, per change).")
@click.option("--interval", type=click.FloatRange(min=0.1), default=0.5, show_default=True,
              help="--follow: seconds between looks at the run's files.")
@click.option("--broker/--no-broker", "ask_broker", cls=FlagEnvOption, default=True, show_default=True,
              help="Ask the broker for the depth of the dead-letter queues (skipped if it does not answer).")
@click.option("--amqp-url", default=DEFAULT_AMQP_URL, envvar="FEDMQ_AMQP_URL", show_default=True,
              help="RabbitMQ URL, for the dead-letter queues.")
@click.option("--namespace", default=None, envvar="FEDMQ_NAMESPACE",
              help="Namespace of the dead-letter queues (default: the run's, from history.json).")
@fails_cleanly
def status(run_dir: str | None, follow: bool, as_json: bool, interval: float, ask_broker: bool, amqp_url: str,
           namespace: str | None) -> None:
    """Where a run stands: version, accuracy, updates/s, fates, dead letters, and one row per
    worker, from RUN_DIR's history.json and updates.jsonl (default: the newest run in ./runs)."""
    import time

    from fedmq.status import DONE_STATES, LedgerReader, collect, find_run_dir, render, signature

    path = find_run_dir(run_dir)
    ledger = LedgerReader(path / "updates.jsonl")
    broker_ok = ask_broker

    def show() -> str:
        nonlocal broker_ok
        doc = collect(path, ledger=ledger, amqp_url=amqp_url, namespace=namespace, broker=broker_ok)
        why = str(doc["dead_letters"].get("why", ""))
        if follow and broker_ok and not doc["dead_letters"].get("known") and "not on the broker" not in why:
            broker_ok = False  # an unreachable broker is not asked again on every refresh
        if as_json:
            click.echo(json.dumps(doc, indent=None if follow else 2))
        else:
            if follow and sys.stdout.isatty():
                click.clear()
            click.echo(render(doc) + ("\n" if follow else ""))
        return str(doc["state"])

    if not follow:
        show()
        return
    seen: tuple[Any, ...] | None = None
    try:
        while True:
            now = signature(path)
            if now != seen:
                seen = now
                if show() in DONE_STATES:
                    return
            time.sleep(interval)  # watching another process's files: nothing to block on
    except KeyboardInterrupt:
        sys.exit(130)


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False, exists=True))
@click.option("-o", "--output", type=click.Path(dir_okay=False), default="curves.png", show_default=True,
              help="Image file; its extension picks the format (.png, .pdf, .svg, ...).")
@click.option("--target", type=click.FloatRange(0, 1), default=None,
              help="Accuracy line to draw (default: each run's own --target-accuracy, if it had one).")
@fails_cleanly
def plot(run_dirs: tuple[str, ...], output: str, target: float | None) -> None:
    """Plot accuracy and loss against wall time and updates, the staleness of applied updates,
    and a timeline of each run's workers (which worker sent which update when, by fate), for
    one or more runs."""
    from fedmq.plot import check_output, plot_runs

    check_output(output)
    plot_runs(list(run_dirs), output, target=target)
    click.echo(f"wrote {output}")


if __name__ == "__main__":
    main()
