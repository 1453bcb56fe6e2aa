"""The ClientApp: one stand-in training step per train message (see task.py)."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmq_flower_bench.workload import SHARD_EXAMPLES, perturb

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    arrays = msg.content["arrays"].to_numpy_ndarrays()
    server_round = int(msg.content["config"]["server-round"])
    updated = perturb(arrays, call_seed=server_round * 100_003 + int(context.node_id) % 100_003)
    content = RecordDict({"arrays": ArrayRecord(updated),
                          "metrics": MetricRecord({"num-examples": SHARD_EXAMPLES})})
    return Message(content=content, reply_to=msg)
