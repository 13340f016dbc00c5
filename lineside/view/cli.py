"""`linegate view`: arguments and main. Imports nothing heavy until main() runs, so that
`linegate --help` works without the `view` extra installed."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Callable

log = logging.getLogger("linegate.view")


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"--http {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8080 or 0.0.0.0:8080")
    return host.strip("[]") or "127.0.0.1", int(port)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bus", metavar="ENDPOINT",
                        help="the runtime's publisher, e.g. tcp://edge-box:5556")
    parser.add_argument("--control", metavar="ENDPOINT",
                        help="the runtime's control endpoint (threshold, pause/resume, load); without it "
                             "the page is read-only")
    parser.add_argument("--db", metavar="PATH|URL",
                        help="the record (`linegate record --db`): SQLite file or postgresql://...; "
                             "the rejects and threshold pages need it")
    parser.add_argument("--http", type=_host_port, default=("127.0.0.1", 8080), metavar="HOST:PORT",
                        help="where to serve the page (default 127.0.0.1:8080; 0.0.0.0:8080 for the "
                             "line's network)")
    parser.add_argument("--auth", metavar="FILE.toml",
                        help="users and roles (viewer/operator; passwords or tokens); without it "
                             "everyone is a viewer and no one can steer")
    parser.add_argument("--quiet-after", type=float, default=5.0, metavar="S",
                        help="show the 'bus quiet' banner after S seconds without a message (default 5)")
    parser.add_argument("--server-key", metavar="FILE|KEY", help="CURVE: the publisher's public key")
    parser.add_argument("--client-key", metavar="FILE", help="CURVE: this view's .key_secret")
    parser.add_argument("--control-server-key", metavar="FILE|KEY",
                        help="CURVE: the control endpoint's public key (default: --server-key)")
    parser.add_argument("--control-client-key", metavar="FILE",
                        help="CURVE: the view's key for the control endpoint, in the runtime's [control] "
                             "allowed_keys to steer, or reader_keys to only read (default: --client-key)")
    parser.add_argument("--hash-password", action="store_true",
                        help="read a password on stdin, print the hash for the --auth file, and exit")


def control_caller(endpoint: str, server_key: str | None, client_key: str | None,
                   timeout_s: float = 5.0) -> Callable[[str, dict, "str | None"], dict]:
    """call(cmd, args, on_behalf_of) -> the reply's result, through edge.control_api's client
    (raises ControlError with the runtime's reason, TimeoutError when it does not answer).
    A client per call: a REQ socket whose reply timed out cannot be used again."""

    def call(cmd: str, args: dict, on_behalf_of: str | None) -> dict:
        # Imported at the first call: the page works (read-only) beside a runtime of any version.
        from edge.control_api import ControlClient

        with ControlClient(endpoint, server_key=server_key, client_key=client_key, timeout_s=timeout_s) as client:
            if cmd == "load":  # the client's load() waits as long as a swap may take
                return client.load(args["bundle"], on_behalf_of=on_behalf_of)
            return client.request(cmd, on_behalf_of=on_behalf_of, **args)

    return call


def main(args: argparse.Namespace) -> int:
    if args.hash_password:
        from .auth import hash_password

        password = sys.stdin.readline().rstrip("\n")
        if not password:
            print("linegate view --hash-password: give the password on stdin", file=sys.stderr)
            return 2
        print(hash_password(password))
        return 0
    try:
        import uvicorn

        from .app import View, create_app
    except ModuleNotFoundError as exc:
        print(f"linegate view: error: needs the Python package {exc.name!r}; pip install 'linegate[view]'",
              file=sys.stderr)
        return 2
    from edge.auth import CurveClient

    from .auth import Users
    from .bus import BusFollower, ControlPoller
    from .record import RecordReader
    from .state import LiveState

    if not args.bus:
        raise ValueError("give --bus ENDPOINT: the runtime's publisher, e.g. tcp://edge-box:5556")
    if (args.server_key is None) != (args.client_key is None):
        raise ValueError("CURVE needs both --server-key and --client-key")
    users = Users.load(args.auth)
    state = LiveState(quiet_after_s=args.quiet_after)
    curve = CurveClient.load(args.server_key, args.client_key) if args.server_key else None
    bus = BusFollower(args.bus, state, curve)
    control = poller = None
    if args.control:
        control = control_caller(args.control, args.control_server_key or args.server_key,
                                 args.control_client_key or args.client_key)
        poller = ControlPoller(control, state)
    record = RecordReader(args.db) if args.db else None
    app = create_app(View(state, users, control, record))
    host, port = args.http
    bus.start()
    if poller is not None:
        poller.start()
    log.info("view of %s on http://%s:%d/ (control: %s, record: %s)", args.bus, host, port,
             args.control or "none", args.db or "none")
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=2, access_log=False))
    try:
        server.run()
    finally:
        bus.stop()
        if poller is not None:
            poller.stop()
        if record is not None:
            record.close()
    return 0
