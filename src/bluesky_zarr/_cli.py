"""The ``bluesky-zarr`` command."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._version import __version__
from .catalog._ls import DEFAULT_FIELDS
from .plan._names import DEFAULT_NAME_TEMPLATE

#: Each option's default in its help (argparse adds it to every option that has one).
_FORMATTER = argparse.ArgumentDefaultsHelpFormatter


def _positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _path(text: str) -> str:
    """An argparse type: a local path with ``~`` expanded (as a shell does
    for unquoted words), or an object storage URL as it is."""
    return text if "://" in text else os.path.expanduser(text)


def _flag_names(message: str) -> str:
    """An error message with the command's flags in place of keyword arguments."""
    return (
        message.replace("pass overwrite=True", "pass --overwrite")
        .replace("another name_template", "another --name-template")
        .replace("tiled_api_key= ", "--tiled-api-key ")
        .replace("tiled= ", "--tiled ")
    )


def _tiled_options(args: argparse.Namespace) -> dict[str, Any]:
    """``ZarrWriter``'s ``tiled=`` options from ``--tiled`` and ``--tiled-api-key``."""
    api_key = getattr(args, "tiled_api_key", None)
    if args.tiled is None:
        if api_key is not None:
            args.parser.error("--tiled-api-key is given without --tiled")
        return {}
    # Without a key, Tiled's client reads TILED_API_KEY itself.
    return {"tiled": args.tiled, "tiled_api_key": api_key}


def _add_tiled_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tiled", metavar="URI", default=None,
        help="register every run written with this Tiled container, by reference, e.g. "
        "http://host:8000/api/v1/metadata/raw (default: %(default)s, no registration)",
    )
    parser.add_argument(
        "--tiled-api-key", metavar="KEY", default=argparse.SUPPRESS,
        help="Tiled API key (default: $TILED_API_KEY)",
    )
    parser.set_defaults(parser=parser)


def _tiled_failures(command: str, uri: str, failures: list[tuple[str, str]]) -> int:
    """Report the stores that could not be registered; the exit status."""
    for store, error in failures:
        print(f"bluesky-zarr {command}: error: {store} not registered with Tiled: {error}",
              file=sys.stderr)
    if failures:
        stores = " ".join(store for store, _ in failures)
        print(f"bluesky-zarr {command}: the stores are written; register them with: "
              f"bluesky-zarr register --tiled {uri} {stores}", file=sys.stderr)
    return 1 if failures else 0


def _replay_flag_names(message: str) -> str:
    """:func:`_flag_names`, and the flags only ``replay`` has."""
    return re.sub(
        r"pass handler_registry=\{'([^']*)': HandlerClass\} to ZarrWriter",
        r"pass --handler \1=module:Class (or install a package that declares one, such "
        r"as area-detector-handlers)",
        _flag_names(message)
        .replace("pass external='reference'", "pass --external reference")
        .replace("or external='reference' to", "or --external reference to")
        .replace("or root_map= to say", "or --root-map OLD=NEW to say")
        .replace("pass overwrite=True", "pass --overwrite"),
    )


def _root_map_entry(text: str) -> tuple[str, str]:
    """``OLD=NEW`` of ``--root-map``: where a directory the documents name is
    mounted here."""
    old, sep, new = text.partition("=")
    if not sep or not old or not new:
        raise argparse.ArgumentTypeError(
            f"expected OLD=NEW (the directory the documents name = where it is here), "
            f"got {text!r}"
        )
    return old, _path(new)


def _demo(args: argparse.Namespace) -> int:
    import xarray as xr
    from bluesky import RunEngine
    from bluesky.plans import grid_scan
    from bluesky.utils import RunEngineInterrupted
    from ophyd.sim import det

    from . import ZarrWriter
    from .sim import PointCamera, motors

    out = Path(args.out)
    wavelength, position = motors("wavelength", "position")
    cam = PointCamera([wavelength, position], shape=(args.size, args.size), name="cam")
    writer = ZarrWriter(out)
    RE = RunEngine({})
    interrupted: list[str] = []

    def write(name: str, doc: dict[str, Any]) -> Any:
        # RE.abort(reason=...) does not reach the stop document when the
        # plan closes its run itself (its reason is then ""): say why here.
        if name == "stop" and interrupted and not doc.get("reason"):
            doc = {**doc, "reason": interrupted[0]}
        return writer(name, doc)

    RE.subscribe(write)
    n_wl, n_pos = args.wavelengths, args.positions
    print(
        f"Scanning {n_wl} wavelengths x {n_pos} positions, one {args.size}x{args.size} "
        f"uint16 frame per point, into {out}/ ..."
    )
    t0 = time.perf_counter()
    try:
        RE(grid_scan([cam, det], wavelength, 400, 700, n_wl, position, 0, 5, n_pos,
                     snake_axes=True))
    except (RunEngineInterrupted, KeyboardInterrupt):
        interrupted.append("interrupted")
        return _demo_interrupted(RE, writer)
    elapsed = time.perf_counter() - t0
    store = writer.stores[-1]
    tree = xr.open_datatree(store, engine="zarr")
    primary = tree["primary"].to_dataset()
    image = primary["cam_image"]
    nbytes = image.size * image.dtype.itemsize
    print(f"\nWrote {store} ({nbytes / 1e6:.1f} MB of frames in {elapsed:.1f} s)\n")
    print(primary.drop_attrs())
    print("\ncam_image:", dict(image.sizes), image.dtype)
    print("points written:", int(primary["_written"].sum()), "of", primary["_written"].size)
    spectrum = image.mean(dim=["position", "y", "x"])
    print("\nMean frame intensity per wavelength:")
    for wl, value in zip(spectrum["wavelength"].values, spectrum.values):
        print(f"  {wl:6.1f} nm  {float(value):8.2f}")
    print(f'\nOpen it yourself:\n  xr.open_datatree("{store}", engine="zarr")')
    return 0


def _demo_interrupted(RE: Any, writer: Any) -> int:
    """Ctrl-C paused the RunEngine at its next point: abort the run, so that its
    stop document (exit status ``abort``, reason ``interrupted``) finishes the
    store; exit status 130, as a shell reports Ctrl-C."""
    import json

    if RE.state == "paused":
        RE.abort(reason="interrupted")
    writer._interrupt("interrupted: Ctrl-C")  # a run still open: finished as aborted
    for store in writer.stores:
        info = json.loads((Path(store) / "zarr.json").read_bytes())["attributes"]
        counts = info.get("bluesky_zarr", {}).get("streams", {}).get("primary", {})
        print(f"\nInterrupted: {store} holds {counts.get('written_points', 0)} written "
              f"point(s), exit status {info.get('exit_status')}", file=sys.stderr)
    return 130


def _handler_entry(text: str) -> tuple[str, Any]:
    """``SPEC=module:Class`` of ``--handler``: the class, imported."""
    from ._errors import OptionError
    from .external._handlers import parse_handler

    try:
        return parse_handler(text)
    except OptionError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _replay(args: argparse.Namespace) -> int:
    from ._errors import BlueskyZarrError, ReplayError, ReplayInterrupted
    from .feeds._replay import BATCH_END, ReplayReport, format_summary, replay

    def error(message: str) -> None:
        print(f"bluesky-zarr replay: error: {_replay_flag_names(message)}", file=sys.stderr)

    try:
        report = replay(
            args.files,
            args.out,
            progress=not args.no_progress,
            overwrite=args.overwrite,
            name_template=args.name_template,
            external=args.external,
            root_map=dict(args.root_map or []),
            handler_registry=dict(getattr(args, "handler", None) or []),
            **_tiled_options(args),
        )
    except ReplayInterrupted as err:
        print(_replay_flag_names(format_summary(err.report, args.out)))
        print(
            f"bluesky-zarr replay: interrupted ({err.signal_name}): the runs being written "
            f"are kept, marked incomplete; the files after them were not replayed",
            file=sys.stderr,
        )
        _tiled_failures("replay", args.tiled, err.report.tiled_failures)
        return EXIT_INTERRUPTED
    except ReplayError as err:
        report = err.report or ReplayReport()
        if err.report is not None:  # else nothing was replayed
            print(_replay_flag_names(format_summary(report, args.out)))
        # One line per run not replayed whole, then what stopped the replay
        # (unless that is the list of those runs).
        for problem in report.problems():
            error(problem)
        if err.location != BATCH_END:
            error(str(err))
        if err.report is not None:
            _tiled_failures("replay", args.tiled, err.report.tiled_failures)
        return 1
    except BlueskyZarrError as err:
        error(str(err))
        return 1
    print(_replay_flag_names(format_summary(report, args.out)))
    return _tiled_failures("replay", args.tiled, report.tiled_failures)


def _inspect(args: argparse.Namespace) -> int:
    import json

    from ._errors import BlueskyZarrError
    from .catalog._inspect import describe_store, format_description

    try:
        description = describe_store(args.store)
    except BlueskyZarrError as err:
        print(f"bluesky-zarr inspect: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # the storage itself: no such bucket, no permission
        print(f"bluesky-zarr inspect: error: cannot read {args.store}: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(description, indent=2))
    else:
        print(format_description(description))
    return 0


def _serve(args: argparse.Namespace) -> int:
    import logging

    from ._errors import BlueskyZarrError
    from .feeds._serve import DocumentService

    if args.kafka is not None:
        return _serve_kafka(args)
    for option in ("topic", "group_id", "kafka_config", "kafka_config_file"):
        if getattr(args, option):
            print(
                f"bluesky-zarr serve: error: --{option.replace('_', '-')} needs --kafka",
                file=sys.stderr,
            )
            return 2
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s bluesky-zarr serve: %(message)s", force=True
    )
    try:
        service = DocumentService(
            args.zmq,
            args.out,
            prefix=args.prefix.encode(),
            overwrite=args.overwrite,
            name_template=args.name_template,
            durable=args.durable,
            **_tiled_options(args),
        )
    except BlueskyZarrError as err:
        print(f"bluesky-zarr serve: error: {_flag_names(str(err))}", file=sys.stderr)
        return 2
    service.run()
    # Stores not registered with Tiled (logged with the register command).
    return 1 if service.writer.tiled_failures else 0


def _register(args: argparse.Namespace) -> int:
    from ._errors import BlueskyZarrError
    from .catalog._tiled import connect, register_store

    try:
        node = connect(args.tiled, getattr(args, "api_key", None))
    except BlueskyZarrError as err:
        print(f"bluesky-zarr register: error: {err}", file=sys.stderr)
        return 1
    failed = 0
    try:
        for store in args.stores:
            try:
                report = register_store(node, store, relocate=args.relocate)
            except BlueskyZarrError as err:
                print(f"bluesky-zarr register: error: {err}", file=sys.stderr)
                failed += 1
                continue
            if not report.changed:
                status = "already registered, unchanged"
            else:
                status = (
                    f"{len(report.created)} node(s) created, {len(report.updated)} updated"
                )
            print(f"{store}: run {report.uid}: {status}")
            if report.relocated_from:
                print(f"  moved here from {report.relocated_from}")
            for path in report.removed:
                print(f"  removed: {path} (no longer in the store)")
            for uid in report.retired:
                print(f"  run {uid}, registered from this store before it was replaced: "
                      f"its streams removed, its entry kept as a record")
            for path, why in report.skipped.items():
                print(f"  not registered: {path}: {why}")
    finally:
        node.context.close()
    return 1 if failed else 0


def _ls(args: argparse.Namespace) -> int:
    import json

    from ._errors import BlueskyZarrError
    from .catalog._ls import format_listing, list_stores

    fields = getattr(args, "fields", None) or list(DEFAULT_FIELDS)
    problems: list[str] = []
    try:
        entries = list_stores(args.location, fields=fields, problems=problems)
    except (BlueskyZarrError, OSError) as err:
        print(f"bluesky-zarr ls: error: {err}", file=sys.stderr)
        return 1
    for problem in problems:
        print(f"bluesky-zarr ls: warning: {problem}", file=sys.stderr)
    if args.json:
        print(json.dumps(entries, indent=2))
    elif entries:
        print(format_listing(entries, fields))
    else:
        print(f"bluesky-zarr ls: no bluesky-zarr stores under {args.location}", file=sys.stderr)
    return 0


def _serve_kafka(args: argparse.Namespace) -> int:
    import logging

    from ._errors import BlueskyZarrError, ServeError
    from .feeds._kafka import KafkaDocumentService, parse_config, read_config_file

    try:
        if not args.topic or not args.group_id:
            raise ServeError("serve --kafka needs --topic (one or more) and --group-id")
        if args.overwrite:
            raise ServeError(
                "--overwrite does not apply to --kafka: the service replaces only the "
                "unfinished store of a run it re-reads"
            )
        config = {}
        for path in args.kafka_config_file or []:
            config.update(read_config_file(path))
        config.update(parse_config(args.kafka_config or []))
        service = KafkaDocumentService(
            args.kafka,
            args.topic,
            args.group_id,
            args.out,
            config=config,
            status_interval=args.status_interval,
            name_template=args.name_template,
            durable=args.durable,
            **_tiled_options(args),
        )
    except BlueskyZarrError as err:
        print(f"bluesky-zarr serve: error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s bluesky-zarr serve: %(message)s", force=True
    )
    service.run()
    return 1 if service.writer.tiled_failures else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bluesky-zarr",
        description="Write Bluesky runs into Zarr V3 stores shaped like the experiment.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="run a simulated wavelength x position x camera scan and summarise it",
        formatter_class=_FORMATTER,
    )
    demo.add_argument(
        "--out", type=_path, default="bluesky-zarr-demo", help="root directory of the store"
    )
    demo.add_argument(
        "--wavelengths", type=_positive_int, default=10, help="points along wavelength"
    )
    demo.add_argument("--positions", type=_positive_int, default=20, help="points along position")
    demo.add_argument("--size", type=_positive_int, default=256, help="frame height and width")
    demo.set_defaults(func=_demo)

    replay = commands.add_parser(
        "replay",
        help="convert recorded runs (suitcase-jsonl .jsonl, suitcase-msgpack .msgpack, "
        "optionally .gz) into stores",
        formatter_class=_FORMATTER,
    )
    replay.add_argument(
        "files", nargs="+", type=_path, metavar="FILE", help="recorded document files"
    )
    replay.add_argument(
        "--out", type=_path, required=True, default=argparse.SUPPRESS,
        help="root of the stores: a directory or s3://bucket/prefix (required)",
    )
    replay.add_argument(
        "--name-template", default=DEFAULT_NAME_TEMPLATE, help="store name over the start doc"
    )
    replay.add_argument("--overwrite", action="store_true", help="replace existing stores")
    replay.add_argument("--no-progress", action="store_true", help="no progress bar")
    replay.add_argument(
        "--external", choices=("fill", "reference", "virtual"), default="fill",
        help="detector files: read their frames in (fill), record the references only "
        "(reference), or reference them in place in an Icechunk store (virtual)",
    )
    replay.add_argument(
        "--root-map", action="append", type=_root_map_entry, metavar="OLD=NEW",
        help="a directory the documents name, and where it is mounted here (repeatable)",
    )
    replay.add_argument(
        "--handler", action="append", type=_handler_entry, metavar="SPEC=module:Class",
        default=argparse.SUPPRESS,
        help="the handler class that reads ophyd v1 resources of a spec, e.g. "
        "AD_HDF5=area_detector_handlers.handlers:AreaDetectorHDF5Handler (repeatable; "
        "default: NPY_SEQ built in, and the handlers installed packages declare as "
        "databroker.handlers entry points, such as area-detector-handlers)",
    )
    _add_tiled_options(replay)
    replay.set_defaults(func=_replay)

    serve = commands.add_parser(
        "serve",
        help="write every run published through a bluesky 0MQ proxy or Kafka, until stopped",
        formatter_class=_FORMATTER,
    )
    source = serve.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--zmq", metavar="HOST:PORT",
        help="the 0MQ proxy's outbound address (bluesky-0MQ-proxy's second port)",
    )
    source.add_argument(
        "--kafka", metavar="BOOTSTRAP",
        help="Kafka bootstrap servers, host:port[,host:port...] (bluesky-kafka Publisher)",
    )
    serve.add_argument(
        "--topic", action="append", metavar="TOPIC", help="Kafka topic to consume (repeatable)"
    )
    serve.add_argument(
        "--group-id", metavar="GROUP", help="Kafka consumer group; instances share its work"
    )
    serve.add_argument(
        "--kafka-config", action="append", metavar="KEY=VALUE",
        help="a Kafka client (librdkafka) property, e.g. security.protocol=SASL_SSL "
        "(repeatable)",
    )
    serve.add_argument(
        "--kafka-config-file", action="append", type=_path, metavar="FILE",
        help="a file of Kafka client properties, one key=value a line (keeps secrets "
        "off the command line)",
    )
    serve.add_argument(
        "--status-interval", type=float, default=30.0, metavar="SECONDS",
        help="seconds between status lines (--kafka)",
    )
    serve.add_argument(
        "--durable", action="store_true",
        help="fsync every file before a point is marked written",
    )
    serve.add_argument(
        "--out", type=_path, required=True, default=argparse.SUPPRESS,
        help="root of the stores: a directory or s3://bucket/prefix (required)",
    )
    serve.add_argument(
        "--prefix",
        default="",
        help="only documents published with this prefix (default: %(default)r, every document)",
    )
    serve.add_argument(
        "--name-template", default=DEFAULT_NAME_TEMPLATE, help="store name over the start doc"
    )
    serve.add_argument("--overwrite", action="store_true", help="replace existing stores")
    _add_tiled_options(serve)
    serve.set_defaults(func=_serve)

    inspect = commands.add_parser(
        "inspect",
        help="show a store's run, streams, arrays and how much is written",
        formatter_class=_FORMATTER,
    )
    inspect.add_argument(
        "store", type=_path, metavar="STORE", help="a store's directory or s3:// URL"
    )
    inspect.add_argument("--json", action="store_true", help="machine-readable JSON")
    inspect.set_defaults(func=_inspect)

    register = commands.add_parser(
        "register",
        help="register stores with a Tiled server, by reference (again: brings them up to "
        "date, changes nothing if they are)",
        formatter_class=_FORMATTER,
    )
    register.add_argument(
        "stores", nargs="+", type=_path, metavar="STORE", help="store directories or URLs"
    )
    register.add_argument(
        "--tiled", required=True, metavar="URI", default=argparse.SUPPRESS,
        help="the Tiled container to register the runs in, e.g. "
        "http://host:8000/api/v1/metadata/raw (required)",
    )
    register.add_argument(
        "--api-key", default=argparse.SUPPRESS,
        help="Tiled API key (default: $TILED_API_KEY)"
    )
    register.add_argument(
        "--relocate", action="store_true",
        help="a run registered from another store that moved here: point its entry here",
    )
    register.set_defaults(func=_register)

    ls = commands.add_parser(
        "ls",
        help="list the runs stored under a directory or s3:// URL, newest first",
        formatter_class=_FORMATTER,
    )
    ls.add_argument(
        "location", type=_path, metavar="DIR_OR_URL",
        help="a directory of stores, or s3://bucket/prefix",
    )
    ls.add_argument(
        "--field", dest="fields", action="append", metavar="NAME", default=argparse.SUPPRESS,
        help="a start document field to show (repeat for several; "
        f"default: {', '.join(DEFAULT_FIELDS)})",
    )
    ls.add_argument("--json", action="store_true", help="machine-readable JSON")
    ls.set_defaults(func=_ls)
    for command in commands.choices.values():
        # Also after the command's name (the command's own default leaves the
        # one given before it alone).
        command.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS,
            help=f"{_DEBUG_HELP} (default: off)",
        )
    return parser


_DEBUG_HELP = "show the traceback of an error, not only its one-line message"

#: Exit status when standard output is closed early (``| head``): that of a
#: process ended by SIGPIPE, as the shell reports it (128 + 13).
EXIT_CLOSED_PIPE = 141

#: Exit status after Ctrl-C (128 + SIGINT), as the shell reports it.
EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; errors a user can fix are one line on stderr.

    A :class:`~bluesky_zarr.BlueskyZarrError` or an ``OSError`` (a path that
    is a file, a missing permission) prints ``bluesky-zarr <command>: error:
    <message>`` and exits 1; ``--debug`` shows its traceback instead. Any other
    exception is a bug, and shows its traceback. Standard output closed early
    (``| head``) ends the command quietly.
    """
    from ._errors import BlueskyZarrError

    args = build_parser().parse_args(argv)
    try:
        status = int(args.func(args))
        # Written here, inside the try, rather than at exit: a reader that
        # went away is then seen as such.
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        _discard_stdout()
        return EXIT_CLOSED_PIPE
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"bluesky-zarr {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (BlueskyZarrError, OSError) as err:
        if args.debug:
            raise
        message = str(err) if isinstance(err, BlueskyZarrError) else _os_error(err)
        print(f"bluesky-zarr {args.command}: error: {_flag_names(message)}", file=sys.stderr)
        return 1


def _os_error(err: OSError) -> str:
    """An ``OSError`` in words: what failed on which file."""
    what = err.strerror or str(err) or type(err).__name__
    names = [n for n in (err.filename, err.filename2) if n is not None]
    return f"{what}: {' -> '.join(str(n) for n in names)}" if names else what


def _discard_stdout() -> None:
    """Send what is left of standard output nowhere: the reader has gone, and
    the interpreter's last flush must not fail again at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no file descriptor (a captured stdout)
        pass


if __name__ == "__main__":
    sys.exit(main())
