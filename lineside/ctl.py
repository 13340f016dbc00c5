"""`linegate ctl ENDPOINT COMMAND ...`: steer a running line over its control endpoint.

    linegate ctl tcp://127.0.0.1:5557 status
    linegate ctl tcp://127.0.0.1:5557 threshold 0.42 [--camera cam1]   (--clear: back to the bundle's)
    linegate ctl tcp://127.0.0.1:5557 pause | resume
    linegate ctl tcp://127.0.0.1:5557 load /opt/linegate/bundles/v7

With CURVE, ``--server-key`` (the runtime's public key) and ``--client-key`` (an operator's
.key_secret whose public key is in the runtime's [control] allowed_keys) as for `watch`.
Exit status: 0 done, 1 refused by the runtime (the reason is printed), 3 no reply.
"""
from __future__ import annotations

import argparse
import json
import sys

from edge.control_api import ControlClient, ControlError


def _common(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """The options every command takes, before or after the command's name."""
    d = (lambda v: v) if defaults else (lambda v: argparse.SUPPRESS)  # noqa: E731
    parser.add_argument("--server-key", default=d(None), help="CURVE: the runtime's public key (.key file or text)")
    parser.add_argument("--client-key", default=d(None), help="CURVE: this operator's .key_secret file")
    parser.add_argument("--timeout", type=float, default=d(5.0), help="seconds to wait for a reply (load: 600)")
    parser.add_argument("--for", dest="on_behalf_of", default=d(None), metavar="USER",
                        help="the person this command is sent for (logged, in the event's who)")
    parser.add_argument("--json", action="store_true", default=d(False), help="print the reply's result as JSON")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("endpoint", help="the runtime's control endpoint ([control] endpoint / run --control)")
    _common(parser, defaults=True)
    cmds = parser.add_subparsers(dest="ctl_command", required=True)
    _common(cmds.add_parser("status", help="model, thresholds, paused, cameras, queues, uptime"), False)
    p = cmds.add_parser("threshold", help="set the threshold (line-wide, or one camera's)")
    _common(p, False)
    p.add_argument("value", type=float, nargs="?", default=None)
    p.add_argument("--camera", default=None, help="only this camera")
    p.add_argument("--clear", action="store_true", help="back to the bundle's calibrated threshold "
                   "(with --camera: that camera follows the line's again)")
    _common(cmds.add_parser("pause", help="stop judging (frames are still read and counted)"), False)
    _common(cmds.add_parser("resume", help="judge again"), False)
    p = cmds.add_parser("load", help="hot swap to another bundle (validated and warmed first)")
    _common(p, False)
    p.add_argument("bundle", help="bundle directory, as the runtime's machine sees it")


def _print_status(result: dict, out=sys.stdout) -> None:
    state = "PAUSED" if result.get("paused") else "running"
    print(f"{state}  model {result.get('model_id')}  threshold {result.get('threshold'):.6g}  "
          f"settings v{result.get('settings_version')}  up {result.get('uptime_s', 0):.0f} s  "
          f"run {result.get('run_id')}", file=out)
    thresholds = result.get("thresholds") or {}
    for cid, cam in (result.get("cameras") or {}).items():
        age = cam.get("last_frame_age_s")
        print(f"  {cid}: {cam.get('state')}  {cam.get('fps', 0):.1f} fps  threshold {thresholds.get(cid, 0):.6g}  "
              f"last frame {'-' if age is None else f'{age:.1f} s ago'}", file=out)
    print(f"  queues {result.get('queues')}  config {result.get('config_file')}", file=out)


def main(args: argparse.Namespace) -> int:
    cmd = args.ctl_command
    try:
        client = ControlClient(args.endpoint, args.server_key, args.client_key, timeout_s=args.timeout)
    except ValueError as exc:
        print(f"linegate ctl: error: {exc}", file=sys.stderr)
        return 2
    with client:
        try:
            kw = {"on_behalf_of": args.on_behalf_of}
            if cmd == "threshold":
                if (args.value is None) != args.clear:
                    print("linegate ctl threshold: give a VALUE, or --clear", file=sys.stderr)
                    return 2
                result = client.threshold(args.value, args.camera, **kw)
            elif cmd == "load":
                result = client.load(args.bundle, timeout_s=max(args.timeout, 600.0), **kw)
            elif cmd in ("pause", "resume"):
                result = client.request(cmd, **kw)
            else:
                result = client.status()
        except ControlError as exc:
            print(f"linegate ctl {cmd}: refused: {exc}", file=sys.stderr)
            return 1
        except TimeoutError as exc:
            print(f"linegate ctl {cmd}: {exc}", file=sys.stderr)
            return 3
    if args.json:
        print(json.dumps(result, default=str))
    else:
        _print_status(result)
    return 0
