"""The ServerApp for the Deployment Engine: FedAvg with the run config set by bench/peers/flower.py."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmq_flower_bench.task import run_fedavg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    run_fedavg(grid, hidden=int(cfg["hidden"]), rounds=int(cfg["num-rounds"]), nodes=int(cfg["num-nodes"]),
               round_timeout=float(cfg["round-timeout"]), out=str(cfg["out"]))
