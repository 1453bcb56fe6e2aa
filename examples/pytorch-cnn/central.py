"""The quality reference: the same CNN trained centrally on the same train split as the federation.

``python examples/pytorch-cnn/central.py`` trains ``make_cnn`` on all of the digits training
images (the split ``fedmq run --image`` makes with seed 0: the union of the workers' shards),
with the example's optimizer settings, and prints the test accuracy after each epoch.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fedmq.shared.data import load_dataset
from fedmq.shared.spec import build_spec
from fedmq.torch import TorchTrainer

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    ds = load_dataset("digits", image=True, seed=args.seed)
    config = {"module": f"{HERE}/model.py:make_cnn", "optimizer_kwargs": {"momentum": 0.9}, "device": "cpu"}
    spec = build_spec(TorchTrainer, config, input_shape=ds.sample_shape, num_classes=ds.num_classes, seed=args.seed)
    trainer = TorchTrainer(spec)
    params, started = trainer.init_params(), time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        params = trainer.fit(params, ds.X_train, ds.y_train, epochs=1, batch_size=args.batch_size, lr=args.lr,
                             mu=0.0, seed=args.seed + epoch).params
        loss, accuracy = trainer.evaluate(params, ds.X_test, ds.y_test)
        print(f"epoch {epoch:3d}  test accuracy {accuracy:.4f}  loss {loss:.4f}  {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
