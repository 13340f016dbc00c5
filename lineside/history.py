"""``linegate history DB``: query the record made by ``linegate record``.

Prints decisions (newest first) as lines, or writes them to CSV; lists known gaps and events;
``--image SEQ --out FILE`` writes a decision's stored full-resolution frame beside its overlay.
"""
from __future__ import annotations

import argparse
import csv
import math
import re
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from .store import Store, open_store

# CSV column order: these first, then any other header keys in name order.
CSV_FIRST = ["id", "run_id", "seq", "line", "camera_id", "frame_id", "capture_ts", "capture_time", "publish_ts",
             "decision", "score", "score_norm", "threshold", "aggregate", "model_id", "source", "label", "batch",
             "error", "frame_path", "overlay_path", "replayed", "recorded_ts"]
RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_when(text: str, now: float | None = None) -> float:
    """'2h', '30m', '7d' (ago), an ISO date/time ('2026-12-03', '2026-12-03T08:00', local time unless
    it names a zone) or Unix seconds -> Unix seconds."""
    text = text.strip()
    match = RELATIVE.match(text)
    if match:
        return (time.time() if now is None else now) - float(match[1]) * UNIT_S[match[2]]
    try:
        return datetime.fromisoformat(text).timestamp()  # naive: local time
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give 30m, 2h, 7d (ago), a date/time like 2026-12-03T08:00 "
                                         "or Unix seconds") from None


def _clock(ts: Any) -> str:
    if not isinstance(ts, (int, float)) or not math.isfinite(ts):
        return "-"
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def format_row(d: dict[str, Any]) -> str:
    images = ("F" if d.get("frame_path") else "-") + ("O" if d.get("overlay_path") else "-")
    parts = [_clock(d.get("capture_ts")), str(d.get("camera_id", "?")), f"#{d.get('frame_id', '?')}",
             f"{str(d.get('decision', '?')).upper():7s}", f"score={_num(d.get('score'))}",
             f"thr={_num(d.get('threshold'))}", f"model={d.get('model_id') or '-'}",
             f"run={str(d.get('run_id', ''))[:8]}:{d.get('seq')}", images]
    if d.get("error"):
        parts.append(f"error: {d['error']}")
    return " ".join(parts)


def _csv_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    if isinstance(value, (list, dict)):
        return repr(value)
    return "" if value is None else value


def write_csv(rows: list[dict[str, Any]], out: TextIO) -> None:
    extra = sorted({k for r in rows for k in r} - set(CSV_FIRST))
    writer = csv.DictWriter(out, fieldnames=CSV_FIRST + extra, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(v) for k, v in {**row, "capture_time": _clock(row.get("capture_ts"))}.items()})


def write_image(store: Store, seq: int, out: Path, run: str | None = None, image_root: Path | None = None) -> str:
    """The decision's frame and overlay side by side (or whichever exists) -> ``out``; returns a summary."""
    import cv2
    import numpy as np

    found = store.decisions(seq=seq, limit=50)
    if run:
        found = [d for d in found if str(d.get("run_id", "")).startswith(run)]
    if not found:
        raise ValueError(f"no decision with seq {seq}{f' in run {run}' if run else ''} on record")
    if len({d['run_id'] for d in found}) > 1 and not run:
        print(f"linegate history: seq {seq} exists in {len(found)} runs; showing the newest "
              f"(run {str(found[0]['run_id'])[:8]}); choose with --run", file=sys.stderr)
    d = found[0]
    root = image_root or store.image_root
    paths = [p for p in (d.get("frame_path"), d.get("overlay_path")) if p]
    if not paths or root is None:
        gone = [i for i in store.images_of(d["run_id"], d["seq"]) if i["deleted_ts"]]
        why = (f"deleted by retention on {_clock(gone[0]['deleted_ts'])}" if gone
               else "none was stored (an accept, or a reject whose image did not arrive)")
        raise ValueError(f"decision run {str(d['run_id'])[:8]} seq {seq} ({d.get('decision')}) has no stored image: {why}")
    images = []
    for rel in paths:
        image = cv2.imread(str(root / rel), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"{root / rel}: missing or unreadable (the record lists it); was the image store "
                             "moved? give --images DIR")
        images.append(image)
    if len(images) == 2:  # the overlay (model input size) scaled to the frame's height, beside it
        h = images[0].shape[0]
        w = max(1, round(images[1].shape[1] * h / images[1].shape[0]))
        images = [images[0], cv2.resize(images[1], (w, h), interpolation=cv2.INTER_LINEAR)]
    canvas = np.hstack(images) if len(images) == 2 else images[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), canvas):
        raise ValueError(f"{out}: cannot write (use a .png or .jpg name in a writable folder)")
    kinds = " + ".join(k for k, p in (("frame", d.get("frame_path")), ("overlay", d.get("overlay_path"))) if p)
    return f"{out}: {kinds} of {format_row(d)}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("db", metavar="DB", help="the record: SQLite file or postgresql:// URL")
    parser.add_argument("--since", type=parse_when, metavar="WHEN", help="30m, 2h, 7d (ago), or 2026-12-03T08:00")
    parser.add_argument("--until", type=parse_when, metavar="WHEN")
    parser.add_argument("--camera", help="only this camera id")
    parser.add_argument("--line", help="only this line (a record shared by several recorders' --line)")
    parser.add_argument("--decision", choices=["accept", "reject", "error"])
    parser.add_argument("--limit", type=int, default=50, help="rows to show (default 50; 0: all)")
    parser.add_argument("--csv", metavar="FILE", help="write the matching decisions, every field, to FILE ('-': stdout)")
    parser.add_argument("--gaps", action="store_true", help="list the record's gaps (seqs known to be missing)")
    parser.add_argument("--events", action="store_true", help="list the line's events (threshold, pause, load...)")
    parser.add_argument("--image", type=int, metavar="SEQ", help="write decision SEQ's frame with its overlay to --out")
    parser.add_argument("--run", metavar="RUN_ID", help="with --image: the run (id or its first characters)")
    parser.add_argument("--out", metavar="FILE", help="with --image: the file to write (.png or .jpg)")
    parser.add_argument("--images", metavar="DIR", help="the image store, if not where the recorder left it")


def main(args: argparse.Namespace) -> int:
    if args.image is not None and not args.out:
        raise ValueError("--image SEQ needs --out FILE")
    with open_store(args.db) as store:
        if args.image is not None:
            print(write_image(store, args.image, Path(args.out), args.run, Path(args.images) if args.images else None))
            return 0
        if args.gaps:
            for g in store.gaps(limit=args.limit or 10**9):
                last = "?" if g["last_seq"] is None else g["last_seq"]
                print(f"{_clock(g['noticed_ts'])} run={str(g['run_id'])[:8]} {g['topic']} seqs {g['first_seq']}..{last}"
                      f" ({g['line']}): {g['reason']}")
            return 0
        if args.events:
            for e in store.events(limit=args.limit or 10**9):
                print(f"{_clock(e.get('publish_ts'))} {e.get('what')} by {e.get('who')}: {e.get('before')!r} -> "
                      f"{e.get('after')!r}{' camera ' + str(e['camera_id']) if e.get('camera_id') else ''} "
                      f"(settings v{e.get('settings_version')})")
            return 0
        rows = store.decisions(since=args.since, until=args.until, camera=args.camera, decision=args.decision,
                               limit=args.limit or 2**62, line=args.line)
        if args.csv:
            if args.csv == "-":
                write_csv(rows, sys.stdout)
            else:
                with open(args.csv, "w", newline="") as f:
                    write_csv(rows, f)
                print(f"{args.csv}: {len(rows)} decision(s)")
        else:
            for row in rows:
                print(format_row(row))
        gaps = store.count("gaps")
        if gaps:
            print(f"linegate history: the record has {gaps} gap row(s) (seqs known to be missing): "
                  f"linegate history {args.db} --gaps", file=sys.stderr)
    return 0
