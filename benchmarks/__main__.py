"""The one runner of the declared scenarios (``benchmarks/scenarios.py``).

    python -m benchmarks list                         # every scenario: name, command, what it measures
    python -m benchmarks run NAME [FLAGS ...]         # run one; FLAGS follow its own (the last wins)
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional

from . import common
from .scenarios import BY_NAME, SCENARIOS


def list_scenarios() -> None:
    width = max(len(s.name) for s in SCENARIOS)
    for s in SCENARIOS:
        print(f"{s.name:<{width}}  {s.what}\n{'':<{width}}  {s.command()}")


def run(name: str, extra: list[str]) -> None:
    scenario = BY_NAME[name]
    module = importlib.import_module(f"{__package__}.{scenario.module}")
    print(f"scenario {name}: {' '.join([scenario.command(), *extra])}", flush=True)
    common.entry(module.main, [*scenario.args, *extra])


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the declared scenarios")
    r = sub.add_parser("run", help="run one declared scenario")
    r.add_argument("name", choices=sorted(BY_NAME), metavar="NAME", help="a scenario (see `list`)")
    args, extra = p.parse_known_args(argv)
    if args.command == "list":
        if extra:
            p.error(f"unrecognized arguments: {' '.join(extra)}")
        list_scenarios()
    else:
        run(args.name, extra)


if __name__ == "__main__":
    main(sys.argv[1:])
