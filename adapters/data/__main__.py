"""Command line for the task catalogue (``python -m talora.adapters.data``).

    python -m talora.adapters.data list
    python -m talora.adapters.data prepare [--tasks a,b] [--cache-dir D] [--with-bigbench] [--bigbench-sdist F]
    python -m talora.adapters.data add FILE [--name N] [--template T] [--language en|zh] [--cache-dir D]
"""
from __future__ import annotations

import argparse
import sys

from .sources_pkg import MissingDataError
from .tasks import get_task, list_tasks, prepare_all, register_file_task


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m talora.adapters.data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the known tasks")
    prepare = sub.add_parser("prepare", help="build every split into the cache (offline, except --with-bigbench)")
    prepare.add_argument("--tasks", help="comma-separated task names (default: all built-in tasks)")
    prepare.add_argument("--cache-dir", help="data cache folder (default: $TALORA_CACHE/data or ~/.cache/talora/data)")
    prepare.add_argument("--with-bigbench", action="store_true",
                         help="download bigbench==1.0.0 (358 MB) if its task files are missing")
    prepare.add_argument("--bigbench-sdist", help="extract the task files from this local bigbench-1.0.0.tar.gz")
    add = sub.add_parser("add", help="validate a JSONL/CSV (text,label) file and save it as a user task")
    add.add_argument("path", help="a .jsonl file of {\"text\", \"label\"} objects or a .csv with text,label columns")
    add.add_argument("--name", help="task name (default: the file name)")
    add.add_argument("--template", help="prompt template with {text}, ending where the label starts")
    add.add_argument("--language", default="en", choices=("en", "zh"), help="language of the texts")
    add.add_argument("--cache-dir", help="data cache folder where user_tasks.json is saved")
    return parser


def _list() -> None:
    for name in list_tasks():
        spec = get_task(name)
        labels = ",".join(spec.labels) if spec.labels else "(extractive)"
        print(f"{name:22s} {spec.language} {spec.kind:8s} {labels}")


def _prepare(args) -> None:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    counts = prepare_all(args.cache_dir, tasks, True, fetch_bigbench=args.with_bigbench,
                         bigbench_sdist=args.bigbench_sdist)
    for name, sizes in counts.items():
        print(f"{name:22s} " + "  ".join(f"{split}={n}" for split, n in sizes.items()))


def _add(args) -> None:
    spec = register_file_task(args.path, name=args.name, template=args.template, language=args.language,
                              save=True, cache_dir=args.cache_dir)
    print(f"saved task {spec.name!r} with labels {list(spec.labels)}")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        {"list": lambda: _list(), "prepare": lambda: _prepare(args), "add": lambda: _add(args)}[args.command]()
    except (MissingDataError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
