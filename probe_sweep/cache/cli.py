"""Manage the activation cache: ``python -m probe_sweep.cache list|verify|remove|prune``.

Reads entries with the very functions a run uses (``extraction/activations.py`` and
``entry.py``: meta.json, checksums, the per-key lock, quarantine names), so the CLI and the runs
agree on what an entry is and when it is damaged. Exit status: 0 fine, 1 verify found a damaged
entry, 2 a usage or cache error.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import NoReturn

from filelock import Timeout

from probe_sweep.cache.entry import (
    KEY_RE,
    QUARANTINED_RE,
    STAMP,
    TMP_PREFIX,
    CacheDamaged,
    check_entry,
    discard,
    entry_lock,
    last_used,
)
from probe_sweep.errors import UserError
from probe_sweep.extraction.activations import default_cache_dir

DAY = 86_400.0


@dataclass
class Item:
    """One thing in the cache dir: an entry, a quarantined entry, or a temporary directory."""

    name: str
    kind: str  # entry | quarantined | temporary
    size: int  # bytes on disk
    used: float  # POSIX time of the last use (entry), quarantine (quarantined) or change
    model: str = ""
    corpus: str = ""
    layers: str = ""
    created: str = ""
    problem: str = ""


def disk_size(path: Path) -> int:
    """Bytes a directory takes on disk (allocated blocks, as du counts them)."""
    total = 0
    for parent, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(parent, name)).st_blocks * 512
            except OSError:
                continue
    return total


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def when(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def scan(root: Path, verify: bool = False) -> list[Item]:
    """Everything of the cache's under ``root``, entries first (lock files are not listed).
    Entries are checked as a run checks them (meta.json, each layer file's size and header),
    with ``verify`` also their checksums (reads every byte)."""
    items: list[Item] = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        try:
            item = _item(path, verify)
        except FileNotFoundError:  # removed by a concurrent prune or run meanwhile
            continue
        if item is not None:
            items.append(item)
    order = {"entry": 0, "quarantined": 1, "temporary": 2}
    return sorted(items, key=lambda i: (order[i.kind], i.name))


def _item(path: Path, verify: bool) -> Item | None:
    if not path.is_dir():
        return None
    if KEY_RE.match(path.name):
        item = Item(path.name, "entry", disk_size(path), last_used(path))
        try:
            meta = check_entry(path, verify)
        except CacheDamaged as damage:
            item.problem = damage.problem
        except UserError as exc:
            item.problem = str(exc)
        else:
            item.model = str(meta.get("model") or meta["key_inputs"].get("model"))
            item.corpus = str(meta.get("corpus", f"{meta['n_rows']} tokens"))
            item.layers = ",".join(str(layer) for layer in meta["layers"])
            item.created = str(meta.get("created", ""))
        return item
    if match := QUARANTINED_RE.match(path.name):
        stamp = datetime.strptime(match["stamp"], STAMP).replace(tzinfo=timezone.utc)
        return Item(path.name, "quarantined", disk_size(path), stamp.timestamp())
    if path.name.startswith(TMP_PREFIX):
        return Item(path.name, "temporary", disk_size(path), path.stat().st_mtime)
    return None


def find(root: Path, name: str, kinds: tuple[str, ...] = ("entry",)) -> Item:
    """The item called ``name`` (or the only one whose name starts with it)."""
    items = [i for i in scan(root) if i.kind in kinds]
    exact = [i for i in items if i.name == name]
    matches = exact or [i for i in items if i.name.startswith(name)]
    if len(matches) != 1:
        found = "no" if not matches else f"{len(matches)}"
        raise UserError(
            f"{found} cache entries in {root} match {name!r}; "
            "`python -m probe_sweep.cache list` shows them"
        )
    return matches[0]


def key_of(item: Item) -> str | None:
    """The key whose lock guards ``item`` (temporary dirs are named .tmp-<key>-...)."""
    name = item.name[len(TMP_PREFIX) :] if item.kind == "temporary" else item.name
    key = name[:20]
    return key if KEY_RE.match(key) else None


def delete(root: Path, item: Item) -> None:
    """Delete ``item``, refusing while another process holds its key's lock (computing it)."""
    path, key = root / item.name, key_of(item)
    if path.is_symlink():  # only the link: what it points to is outside the cache's care
        path.unlink()
        return
    if item.kind == "quarantined" or key is None:
        shutil.rmtree(path)
        return
    lock = entry_lock(root, key)
    try:
        lock.acquire(timeout=0)
    except Timeout as exc:
        raise UserError(
            f"{path} is being written by another process (it holds {lock.lock_file}); "
            "try again when that job has finished"
        ) from exc
    try:
        if item.kind == "entry":
            discard(path)
        else:
            shutil.rmtree(path)
    finally:
        lock.release()


def cmd_list(root: Path, args: argparse.Namespace) -> int:
    items = scan(root, args.verify)
    if args.json:
        rows = [{**asdict(i), "used": when(i.used), "used_s": i.used} for i in items]
        print(json.dumps(rows, indent=2))
        return 0
    if not items:
        print(f"no activation cache entries in {root}")
        return 0
    print(f"activation cache {root}")
    for i in items:
        if i.kind != "entry":
            print(f"{i.name}  {human(i.size)}  {i.kind} ({when(i.used)})")
        elif i.problem:
            print(f"{i.name}  {human(i.size)}  DAMAGED: {i.problem}  last used {when(i.used)}")
        else:
            print(
                f"{i.name}  {human(i.size)}  model {i.model}  layers {i.layers}  created "
                f"{i.created}  last used {when(i.used)}  corpus {i.corpus}"
            )
    total = sum(i.size for i in items)
    checked = "checksums verified" if args.verify else "checksums not read: --verify reads them"
    print(
        f"{len([i for i in items if i.kind == 'entry'])} entries, {human(total)} in all "
        f"(meta.json and layer files checked; {checked})"
    )
    return 0


def cmd_verify(root: Path, args: argparse.Namespace) -> int:
    items = [find(root, args.key)] if args.key else [i for i in scan(root) if i.kind == "entry"]
    bad = 0
    for item in items:
        try:
            check_entry(root / item.name, verify=True)
        except CacheDamaged as damage:
            bad += 1
            print(f"CORRUPT {item.name}: {damage.problem}")
        else:
            print(f"OK {item.name}")
    print(f"{len(items)} checked, {bad} corrupt" + (" (a run recomputes them)" if bad else ""))
    return 1 if bad else 0


def cmd_remove(root: Path, args: argparse.Namespace) -> int:
    item = find(root, args.key, ("entry", "quarantined", "temporary"))
    path = root / item.name
    what = f"{path} ({human(item.size)})"
    if path.is_symlink():
        what = f"the symbolic link {path} (what it points to, {os.readlink(path)}, is left alone)"
    delete(root, item)
    print(f"removed {what}")
    return 0


def cmd_prune(root: Path, args: argparse.Namespace) -> int:
    cutoff = time.time() - args.older_than * DAY
    freed = 0
    for item in scan(root):
        if item.used >= cutoff:
            continue
        if not args.dry_run:
            try:
                delete(root, item)
            except (UserError, OSError) as exc:
                print(f"skipped {item.name}: {exc}")
                continue
        freed += item.size
        verb = "would remove" if args.dry_run else "removed"
        print(f"{verb} {item.kind} {item.name} ({human(item.size)}, last used {when(item.used)})")
    print(f"{'would free' if args.dry_run else 'freed'} {human(freed)}")
    return 0


class Parser(argparse.ArgumentParser):
    """argparse with a usage error on one line (and status 2, as argparse's own)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}; see `{self.prog} --help`\n")


def days(text: str) -> float:
    """A number of days: finite and >= 0 (``nan`` would otherwise compare false and prune all)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days >= 0, e.g. 30")
    return value


def parser() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    common.add_argument(
        "--cache-dir",
        default=argparse.SUPPRESS,
        help="the cache (default: $PROBE_SWEEP_CACHE or ~/.cache/probe_sweep/activations, as "
        "activations.cache_dir)",
    )
    main = Parser(
        prog="python -m probe_sweep.cache",
        description="List, verify, remove and prune activation cache entries.",
        parents=[common],
    )
    sub = main.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", parents=[common], help="entries with size, model, corpus, times")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.add_argument("--verify", action="store_true", help="also read every checksum")
    verify = sub.add_parser("verify", parents=[common], help="check every checksum")
    verify.add_argument("key", nargs="?", help="one entry (a key or its unique prefix)")
    remove = sub.add_parser("remove", parents=[common], help="delete one entry")
    remove.add_argument("key", help="an entry's key (or prefix), or a quarantined name")
    prune = sub.add_parser("prune", parents=[common], help="delete what was not used lately")
    prune.add_argument("--older-than", type=days, required=True, metavar="DAYS")
    prune.add_argument("--dry-run", action="store_true", help="only say what would go")
    return main


COMMANDS = {"list": cmd_list, "verify": cmd_verify, "remove": cmd_remove, "prune": cmd_prune}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    root = Path(getattr(args, "cache_dir", None) or default_cache_dir()).expanduser()
    try:
        return COMMANDS[args.command](root, args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into head and the like
        return 0
    except OSError as exc:
        print(f"error: {exc}; check the cache dir {root} (--cache-dir)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
