"""`tessera dlq list|show|replay`: inspect and replay the messages consumers moved to their dead-letter queues;
`tessera queues migrate`: convert the consumer queues to the type TESSERA_QUEUE_TYPE names (queues.py);
`tessera outbox list|retry`: the outbox events the relay parked, and putting them back in line (parked.py).

    tessera dlq list                               dead-letter queue depth of every consumer queue Tessera knows
    tessera dlq list notification.email            the dead-lettered messages of one queue, oldest first
    tessera dlq show notification.email EVENT_ID   one message: headers, last error, payload as JSON
    tessera dlq replay notification.email EVENT_ID [EVENT_ID...] | --all

The broker is TESSERA_AMQP_URL (or --amqp-url). Exit status: 0 done, 1 a message or queue was not found or a
replay stopped early (the ids moved until then are printed; the others stay in the dead-letter queue), 2 a usage
error or the broker could not be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pika.exceptions
from sqlalchemy.engine import make_url

from tessera_runtime import app
from tessera_runtime.config import DEFAULT_AMQP_URL, ConfigError, check_amqp_url
from tessera_runtime.db import Database, cannot_connect, database_location, first_line
from tessera_runtime.messaging import deadletter, parked, queues
from tessera_runtime.messaging.settings import MessagingSettings
from tessera_runtime.messaging.topology import QueueTopology, installed_consumer_routes


def known_queues() -> list[str]:
    """Consumer queues of the services installed here (each composition root's CONSUMER_QUEUES)."""
    queues: list[str] = []
    for module_name in app.SERVICES.values():
        try:
            root = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue
            raise
        queues.extend(getattr(root, "CONSUMER_QUEUES", ()))
    return queues


def _url(args: argparse.Namespace) -> str:
    if args.amqp_url:
        return check_amqp_url(args.amqp_url, "--amqp-url")
    return check_amqp_url(os.environ.get("TESSERA_AMQP_URL") or DEFAULT_AMQP_URL, "TESSERA_AMQP_URL")


def _list(args: argparse.Namespace) -> int:
    url = _url(args)
    if args.queue is None:
        depths = deadletter.depth(url, known_queues())
        if args.json:
            print(deadletter.to_json(depths))
            return 0
        for queue, count in depths.items():
            shown = "not declared" if count is None else str(count)
            print(f"{deadletter.dead_letter_queue(queue):<40} {shown}")
        return 0
    letters = deadletter.browse(url, args.queue, args.limit)
    if args.json:
        print(deadletter.to_json([letter.summary() for letter in letters]))
        return 0
    if not letters:
        print(f"{deadletter.dead_letter_queue(deadletter.consumer_queue(args.queue))} is empty")
    for letter in letters:
        error = letter.error.splitlines()[0] if letter.error else ""
        print(f"{letter.position:>4}  {letter.message_id}  {letter.event_type}  attempts={letter.attempts}  "
              f"replays={letter.replays}  {letter.dead_lettered_at}  {error}")
    return 0


def _show(args: argparse.Namespace) -> int:
    letter = deadletter.find(_url(args), args.queue, args.message_id)
    if letter is None:
        print(f"no message {args.message_id} in the dead-letter queue of {args.queue}", file=sys.stderr)
        return 1
    print(deadletter.to_json(letter.details()))
    return 0


def _replay(args: argparse.Namespace) -> int:
    if not args.all and not args.message_ids:
        print("name the message ids to replay, or pass --all", file=sys.stderr)
        return 2
    wanted = None if args.all else list(dict.fromkeys(args.message_ids))
    queue = deadletter.consumer_queue(args.queue)
    dlq = deadletter.dead_letter_queue(queue)

    def moved(message_id: str) -> None:  # printed as each is moved, so that a failure later loses no line
        print(f"replayed {message_id} to {queue}", flush=True)

    result = deadletter.replay(_url(args), args.queue, wanted, on_moved=moved)
    if result.stopped is not None:
        print(f"replay stopped after {len(result.moved)} message(s): {result.stopped}; "
              f"{result.left} message(s) remain in {dlq}", file=sys.stderr)
        return 1
    missing = [] if wanted is None else [m for m in wanted if m not in result.moved]
    for message_id in missing:
        print(f"no message {message_id} in the dead-letter queue of {queue}", file=sys.stderr)
    if wanted is None and not result.moved:
        print(f"{dlq} is empty")
    elif wanted is None and result.left:
        # Messages dead-lettered while the replay ran (a replayed one failing again, perhaps) are not taken by
        # the same run: replaying until empty could go round forever.
        print(f"{result.left} message(s) reached {dlq} while the replay ran and were left there", file=sys.stderr)
    return 1 if missing else 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number of messages")
    return value


def _guarded(command: Callable[[argparse.Namespace], int],
             name: str = "tessera dlq") -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            _url(args)  # a URL that is none is a usage error, before any broker is asked
            return command(args)
        except ConfigError as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            return 2
        except deadletter.QueueMissing as exc:
            print(str(exc), file=sys.stderr)
            return 1
        except pika.exceptions.AMQPConnectionError as exc:
            print(f"cannot reach the broker at {_url(args).split('@')[-1]}: {exc!r}", file=sys.stderr)
            return 2

    return run


QUEUES_DOC = """Converts the consumer queues of the services installed here (each with its retry queues and
dead-letter queue) to the type TESSERA_QUEUE_TYPE names (classic, the default, or quorum), moving their messages:
classic queues of an earlier deployment to quorum queues, or quorum queues back to classic queues. Queues of that
type already are left as they are. Run it while no consumer of the queues runs (stop every service that consumes
them first), then start the services with the same TESSERA_QUEUE_TYPE. Safe to run again, and after an
interruption (it finishes the job).

The broker is TESSERA_AMQP_URL (or --amqp-url); the exchange and retry delays are TESSERA_EVENTS_EXCHANGE and
TESSERA_CONSUMER_RETRY_DELAYS, as the services have them. Exit status: 0 done, 1 refused (consumers still attached,
a queue declared differently), 2 a usage error or the broker could not be reached.
"""


def _migrate_queues(args: argparse.Namespace) -> int:
    url = _url(args)
    settings = MessagingSettings.from_env(os.environ)
    routes = installed_consumer_routes()
    unknown = [q for q in args.queues if q not in routes]
    if unknown:
        print(f"unknown consumer queue(s) {', '.join(unknown)}; known: {', '.join(sorted(routes))}",
              file=sys.stderr)
        return 2
    chosen = args.queues or sorted(routes)
    topologies = [QueueTopology(settings.events_exchange, q, routes[q], settings.consumer_retry_delays,
                                settings.queue_type) for q in chosen]
    try:
        queues.migrate(url, topologies, on_queue=lambda r: print(r.describe(), flush=True))
    except queues.MigrationRefused as exc:
        print(f"tessera queues migrate: {exc}", file=sys.stderr)
        return 1
    return 0


OUTBOX_DOC = """The outbox events the relay parked: events the broker refuses for good (larger than its
max_message_size, say), kept in the service's outbox and passed over so that the events behind them are published.

    tessera outbox list SERVICE                          the parked events, oldest first: id, type, aggregate,
                                                         size and the broker's reason (--json for JSON)
    tessera outbox retry SERVICE EVENT_ID [EVENT_ID...]  put them back in line once the cause is cured (the
    tessera outbox retry SERVICE --all                   broker's limit raised): the relay publishes them next

The database is the service's (TESSERA_DATABASE_URL, or its default SQLite file under TESSERA_DATA_DIR), or
--database-url. Exit status: 0 done, 1 an event named is not parked in that outbox (the others were put back),
2 a usage error or the database could not be used.
"""


def _outbox_database(args: argparse.Namespace) -> Database:
    """The service's database, from its settings (as `tessera serve` reads them) or --database-url."""
    environ = dict(os.environ)
    if args.database_url is not None:
        environ["TESSERA_DATABASE_URL"] = args.database_url
    try:
        settings = app.load_settings(app.composition_root(args.service), environ)
    except ConfigError as exc:
        message = str(exc)
        if args.database_url is not None:
            message = message.replace("TESSERA_DATABASE_URL", "--database-url")
        raise ConfigError(message) from None
    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite" and url.database and not Path(url.database).is_file():
        # Opening it would create an empty database file where the service has none.
        raise ConfigError(f"no database file at {url.database} (is this the service's TESSERA_DATA_DIR or "
                          "TESSERA_DATABASE_URL?)")
    return Database(settings.database_url)


def _outbox_command(run: Callable[[argparse.Namespace, Database], object]
                    ) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        name = f"tessera outbox {args.outbox_command}"
        try:
            db = _outbox_database(args)
        except ConfigError as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            return 2
        where = database_location(db.url)

        async def in_database() -> object:
            try:
                return await run(args, db)
            finally:
                await db.dispose()

        try:
            outcome = asyncio.run(in_database())
        except parked.OutboxMissing as exc:
            print(f"{name}: the database of {args.service} at {where}: {exc}", file=sys.stderr)
            return 2
        except Exception as exc:
            if not cannot_connect(exc):
                raise
            print(f"{name}: cannot use the database of {args.service} at {where}: {first_line(exc)}",
                  file=sys.stderr)
            return 2
        assert isinstance(outcome, int)
        return outcome

    return command


async def _outbox_list(args: argparse.Namespace, db: Database) -> int:
    events = await parked.parked_events(db, args.limit)
    if args.json:
        print(deadletter.to_json([event.summary() for event in events]))
        return 0
    if not events:
        print(f"no parked event in the outbox of {args.service}")
    for event in events:
        print(f"{event.seq:>6}  {event.event_id}  {event.event_type}  {event.aggregate_type}/{event.aggregate_id}  "
              f"{event.size_bytes} bytes  parked {event.parked_at.isoformat(timespec='seconds')}  {event.reason}")
    return 0


async def _outbox_retry(args: argparse.Namespace, db: Database) -> int:
    wanted = None if args.all else list(dict.fromkeys(args.event_ids))
    retried = await parked.retry(db, wanted)
    for event_id in retried:
        print(f"put back in line: {event_id}")
    missing = [] if wanted is None else [e for e in wanted if e not in retried]
    for event_id in missing:
        print(f"no parked event {event_id} in the outbox of {args.service}", file=sys.stderr)
    if wanted is None and not retried:
        print(f"no parked event in the outbox of {args.service}")
    return 1 if missing else 0


def _checked_retry(args: argparse.Namespace) -> int:
    """Usage errors of `retry`, one line each, before any database is opened."""
    if args.all == bool(args.event_ids):
        print("tessera outbox retry: name the event ids to put back in line, or pass --all (not both)",
              file=sys.stderr)
        return 2
    canonical = []
    for event_id in args.event_ids:
        try:
            canonical.append(str(uuid.UUID(event_id)))  # as the outbox stores it, whatever spelling was given
        except ValueError:
            print(f"tessera outbox retry: {event_id!r} is not an event id (a UUID, as `tessera outbox list` shows)",
                  file=sys.stderr)
            return 2
    args.event_ids = canonical
    return _outbox_command(_outbox_retry)(args)


def _register_outbox(subparsers: argparse._SubParsersAction) -> None:
    outbox = subparsers.add_parser("outbox", help="list the outbox events the relay parked, and put them back in line",
                                   description=OUTBOX_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = outbox.add_subparsers(dest="outbox_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("service", choices=sorted(app.SERVICES), help="the service whose outbox it is")
    common.add_argument("--database-url", help="the service's database (default: as the service reads it, "
                                               "TESSERA_DATABASE_URL)")

    listing = sub.add_parser("list", parents=[common], help="the parked events, oldest first")
    listing.add_argument("--limit", type=_positive_int, default=100, help="at most this many events (default 100)")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=_outbox_command(_outbox_list))

    retry = sub.add_parser("retry", parents=[common], help="put parked events back in line for the relay")
    retry.add_argument("event_ids", nargs="*", help="event ids to put back")
    retry.add_argument("--all", action="store_true", help="put every parked event back")
    retry.set_defaults(func=_checked_retry)


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_outbox(subparsers)
    queue_parser = subparsers.add_parser("queues", help="convert consumer queues to TESSERA_QUEUE_TYPE",
                                         description=QUEUES_DOC,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
    queue_sub = queue_parser.add_subparsers(dest="queues_command", required=True)
    migrate = queue_sub.add_parser("migrate", help="convert the consumer queues to TESSERA_QUEUE_TYPE, with "
                                   "their messages", description=QUEUES_DOC,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    migrate.add_argument("--amqp-url", help="broker URL (default: TESSERA_AMQP_URL)")
    migrate.add_argument("queues", nargs="*", help="consumer queues, e.g. notification.email (default: all)")
    migrate.set_defaults(func=_guarded(_migrate_queues, "tessera queues migrate"))

    dlq = subparsers.add_parser("dlq", help="list, show and replay dead-lettered event messages",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    dlq.add_argument("--amqp-url", help="broker URL (default: TESSERA_AMQP_URL)")
    # Also accepted after the subcommand; SUPPRESS keeps a value given before it.
    url = argparse.ArgumentParser(add_help=False)
    url.add_argument("--amqp-url", default=argparse.SUPPRESS, help="broker URL (default: TESSERA_AMQP_URL)")
    sub = dlq.add_subparsers(dest="dlq_command", required=True)

    listing = sub.add_parser("list", parents=[url], help="dead-letter queue depths, or the messages of one queue")
    listing.add_argument("queue", nargs="?", help="consumer queue, e.g. notification.email")
    listing.add_argument("--limit", type=_positive_int, default=100, help="at most this many messages (default 100)")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=_guarded(_list))

    show = sub.add_parser("show", parents=[url], help="one dead-lettered message in full")
    show.add_argument("queue", help="consumer queue, e.g. notification.email")
    show.add_argument("message_id", help="the event id (AMQP message_id)")
    show.set_defaults(func=_guarded(_show))

    replay = sub.add_parser("replay", parents=[url], help="move dead-lettered messages back to their consumer queue")
    replay.add_argument("queue", help="consumer queue, e.g. notification.email")
    replay.add_argument("message_ids", nargs="*", help="event ids to replay")
    replay.add_argument("--all", action="store_true", help="replay every message of the dead-letter queue")
    replay.set_defaults(func=_guarded(_replay))
