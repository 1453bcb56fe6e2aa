"""Run the app on Flower's Simulation Engine (in-process ServerApp, Ray actors for the ClientApps).

Usage (inside bench/peers/.venv-flower, with this folder on PYTHONPATH so Ray's workers import
the app): ``python simulate.py --hidden H --rounds R --nodes N --cpus-per-client C --out FILE``.
Started by bench/peers/flower.py, which bounds its time and reads FILE.
"""

from __future__ import annotations

import argparse

from fedmq_flower_bench.client_app import app as client_app
from fedmq_flower_bench.task import run_fedavg
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, required=True)
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--cpus-per-client", type=float, default=1.0)
    parser.add_argument("--round-timeout", type=float, default=300.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_fedavg(grid, hidden=args.hidden, rounds=args.rounds, nodes=args.nodes,
                   round_timeout=args.round_timeout, out=args.out)

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=args.nodes,
                   backend_config={"client_resources": {"num_cpus": args.cpus_per_client, "num_gpus": 0.0}})


if __name__ == "__main__":
    main()
