"""The ``recstream`` command: parses arguments and hands each command to the package that owns it.

Commands are imported only when run, so ``recstream publish`` or ``tail`` on a client-only install
never imports torch, transformers or faust. Any error a user can cause ends in one line on stderr
and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

EXIT_USAGE = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """A mistake the user can fix, reported as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


#: Set (unless already set) before a worker's modules load numpy. The ranker's matrix products
#: are small; OpenBLAS's extra threads spin between them and took a third of a core from the
#: event loop and the broker at 500 events/s (docs/performance.md).
WORKER_ENV = {"OPENBLAS_NUM_THREADS": "1"}


def _handler(target: str, env: dict[str, str] | None = None) -> Callable[[argparse.Namespace], int]:
    """A lazily imported command implementation named ``module:function``; ``env`` is set
    (where not already set) before its module is imported."""

    def run(args: argparse.Namespace) -> int:
        for name, value in (env or {}).items():
            os.environ.setdefault(name, value)
        module, func = target.split(":")
        return int(getattr(importlib.import_module(module), func)(args) or 0)

    return run


def _speed(value: str) -> float | None:
    if value == "max":
        return None
    try:
        speed = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"speed must be a number or 'max', not {value!r}"
        ) from None
    if speed <= 0:
        raise argparse.ArgumentTypeError("speed must be positive")
    return speed


def _whole(value: str) -> int:
    """A whole number of 1 or more, for argparse."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {number}")
    return number


def _positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, not {value!r}") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, not {value}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="recstream",
        description="Real-time, explained recommendations from an event stream.",
        epilog="Settings come from RECSTREAM_* environment variables; see docs/configuration.md.",
    )
    parser.add_argument("--env-file", type=Path, help="settings file of RECSTREAM_* lines")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    _add_stack_commands(sub)
    _add_client_commands(sub)
    _add_data_commands(sub)
    doctor = sub.add_parser("doctor", help="check broker, topics, vector store, encoder and GPU")
    doctor.add_argument("--timeout", type=_positive, default=5.0, help="seconds per network check")
    doctor.add_argument("--json", action="store_true", help="print the findings as JSON")
    doctor.set_defaults(run=_handler("infra.doctor:cli_doctor"))
    schemas = sub.add_parser("schemas", help="event contracts")
    schemas_sub = schemas.add_subparsers(
        dest="schemas_command", required=True, parser_class=_Parser
    )
    export = schemas_sub.add_parser("export", help="write the JSON Schema of every event type")
    export.add_argument("dir", type=Path)
    export.set_defaults(run=_cli_schemas_export)
    return parser


def _add_stack_commands(sub: argparse._SubParsersAction[_Parser]) -> None:
    """up, demo, worker."""
    up = sub.add_parser("up", help="embedded broker + topics + worker (role all); Ctrl-C stops all")
    up.add_argument("--data-dir", type=Path, help="vector store and worker state (default .data)")
    up.add_argument("--port", type=int, default=9092, help="broker port (default 9092)")
    up.set_defaults(run=_handler("streams.up:cli_up", WORKER_ENV))

    demo = sub.add_parser("demo", help="`up` + demo catalogue + simulated users + live view")
    demo.add_argument("--data-dir", type=Path, help="where the demo keeps its state (.data/demo)")
    demo.add_argument("--port", type=int, default=0, help="broker port (default: a free one)")
    demo.add_argument(
        "--duration",
        type=_positive,
        default=None,
        help="stop after this many seconds (default: run until Ctrl-C)",
    )
    demo.add_argument("--rate", type=_positive, default=2.0, help="simulated events per second")
    demo.set_defaults(run=_handler("streams.demo:cli_demo", WORKER_ENV))

    demo.add_argument(
        "--console-port",
        type=int,
        default=None,
        help="web console port on loopback (default console.port, 8088; 0 = any free port)",
    )
    demo.add_argument("--no-console", action="store_true", help="do not start the web console")

    console = sub.add_parser(
        "console", help="web console: live storefront, operations and evaluation pages"
    )
    console.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    console.add_argument("--port", type=int, default=None, help="port (default 8088; 0 = any)")
    console.add_argument(
        "--worker-url",
        action="append",
        default=None,
        dest="worker_urls",
        help="a worker's web address whose /metrics to chart (repeatable; default the local one)",
    )
    console.add_argument("--eval-dir", type=Path, default=None, help="recstream eval results")
    console.set_defaults(run=_handler("streams.console:cli_console"))

    worker = sub.add_parser("worker", help="one Faust worker against the configured Kafka/Qdrant")
    worker.add_argument("--role", choices=["all", "ingest", "encoder", "recommend"], default="all")
    worker.set_defaults(run=_handler("streams.up:cli_worker", WORKER_ENV))


def _add_client_commands(sub: argparse._SubParsersAction[_Parser]) -> None:
    """publish, tail, archive."""
    publish = sub.add_parser("publish", help="publish events from a file to their topics")
    publish.add_argument("file", type=Path)
    publish.add_argument("--format", choices=["jsonl", "csv", "parquet"], default=None)
    publish.set_defaults(run=_handler("producers.cli:cli_publish"))

    tail = sub.add_parser("tail", help="read recommendations")
    tail.add_argument("--user", default=None)
    tail.add_argument("--max", type=int, default=None, dest="max_n")
    tail.add_argument("--timeout", type=_positive, default=None)
    tail.add_argument("--json", action="store_true")
    tail.set_defaults(run=_handler("consumers.cli:cli_tail"))

    archive = sub.add_parser("archive", help="topics -> rolling Parquet event log")
    archive.add_argument("--out", type=Path, required=True)
    archive.add_argument("--topics", default=None, help="comma-separated topic names")
    archive.add_argument(
        "--idle-timeout",
        type=_positive,
        default=None,
        help="stop after this many seconds without a message",
    )
    archive.add_argument(
        "--compact",
        action="store_true",
        help="consume nothing: rewrite the archive in --out without the rows of forgotten users",
    )
    archive.set_defaults(run=_handler("consumers.cli:cli_archive"))


def _add_data_commands(sub: argparse._SubParsersAction[_Parser]) -> None:
    """replay, data import, eval, eval-online."""
    replay = sub.add_parser("replay", help="event log -> topics, in event-time order")
    replay.add_argument("log", type=Path, help="a Parquet event log (file or directory)")
    replay.add_argument(
        "--speed",
        type=_speed,
        default=None,
        help="'max' (default) or a factor of event time, e.g. 60 = 1 h per minute",
    )
    replay.set_defaults(run=_handler("producers.replay:cli_replay"))

    data = sub.add_parser("data", help="datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    imp = data_sub.add_parser("import", help="a public dataset -> a Parquet event log")
    imp.add_argument("--format", required=True, choices=["recbole", "movielens", "amazon-reviews"])
    imp.add_argument("src", type=Path)
    imp.add_argument("-o", "--out", type=Path, required=True)
    imp.add_argument("--item-text", type=Path, default=None, help="CSV with columns item_id,text")
    imp.set_defaults(run=_handler("producers.importers.cli:cli_import"))

    ev = sub.add_parser("eval", help="offline evaluation of an event log")
    ev.add_argument("log", type=Path)
    ev.add_argument("--out", type=Path, required=True)
    ev.add_argument("--protocol", choices=["loo", "prequential"], default="loo")
    ev.add_argument("--models", default="mostpop,covisit,textknn,ranker")
    ev.add_argument("--model-dir", type=Path, default=None)
    ev.add_argument("--k", default="10,50", help="comma-separated cut-offs")
    ev.add_argument(
        "--mmr-sweep",
        default=None,
        help="comma-separated MMR lambdas: also rank with each, for the accuracy/diversity plot",
    )
    ev.add_argument(
        "--unmasked",
        action="store_true",
        help="do not remove the user's earlier items from the ranking",
    )
    ev.set_defaults(run=_handler("models.evaluation.cli:cli_eval"))

    train = sub.add_parser("train", help="train the ranking model from an event log")
    train.add_argument("log", type=Path, help="a Parquet event log (file or directory)")
    train.add_argument("--out", type=Path, required=True, help="the model directory to write")
    train.add_argument(
        "--holdout",
        choices=["loo", "time"],
        default="loo",
        help="validation events: each user's second-to-last item (loo), or a later time slice",
    )
    train.add_argument("--max-epochs", type=int, default=40, help="sequential model epochs at most")
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(run=_handler("models.training:cli_train"))

    reenc = sub.add_parser(
        "reencode", help="encode again every stored vector that is not from the current encoder"
    )
    reenc.add_argument("log", type=Path, help="the Parquet event log the catalogue came from")
    reenc.add_argument("--batch-size", type=_whole, default=256, help="texts per batch")
    reenc.set_defaults(run=_handler("streams.reencode:cli_reencode"))

    online = sub.add_parser("eval-online", help="live HR@K from the recommendation topic")
    online.add_argument("--k", type=int, default=10)
    online.add_argument(
        "--window",
        type=_positive,
        default=3600.0,
        help="seconds of event time in which the next behaviour counts",
    )
    online.add_argument(
        "--timeout",
        type=_positive,
        default=None,
        help="stop after this many seconds without a message",
    )
    online.add_argument("--json", type=Path, default=None, help="also write the figures here")
    online.add_argument(
        "--from-ts",
        type=int,
        default=None,
        help="score only interactions at or after this time (ms), e.g. a model's trained_until_ts",
    )
    online.set_defaults(run=_handler("consumers.online_eval:cli_eval_online"))


def _cli_schemas_export(args: argparse.Namespace) -> int:
    from schemas.export import export_json_schemas

    for path in export_json_schemas(args.dir):
        print(path)
    return 0


def load_cli_settings(args: argparse.Namespace, **overrides: Any) -> Any:
    """The one Settings object for a command, with ``--data-dir`` applied."""
    from infra.logs import configure_logging
    from infra.settings import load_settings

    if getattr(args, "data_dir", None) is not None:
        overrides["data_dir"] = args.data_dir
    settings = load_settings(args.env_file, **overrides)
    configure_logging(settings.log_level, settings.log_json)
    return settings


def _known_errors() -> tuple[type[BaseException], ...]:
    from pydantic import ValidationError

    from infra.broker import BrokerStartError
    from infra.kafka import BrokerUnreachable

    errors: list[type[BaseException]] = [
        UserError,
        BrokerStartError,
        BrokerUnreachable,
        FileNotFoundError,
        ValidationError,
    ]
    for module, name in (
        ("producers.publish", "PublishError"),
        ("models.encoder", "EncoderLoadError"),
        ("models.trained", "ModelDirError"),
        ("infra.vectors.retry", "VectorStoreUnavailable"),
    ):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except ImportError:  # that part is not installed; its errors cannot occur either
            continue
    return tuple(errors)


def _one_line(exc: BaseException) -> str:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        err = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in err["loc"])
        return f"invalid setting {where}: {err['msg']}"
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except _known_errors() as exc:
        print(f"recstream: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    # Run the importable module's main, so the error classes that command modules raise
    # (infra.cli.UserError) are the ones it catches, not copies defined in __main__.
    from infra.cli import main as entry

    sys.exit(entry())
