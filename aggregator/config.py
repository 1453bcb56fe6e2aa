"""The aggregator's settings: one frozen dataclass, validated once, recorded in history.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from fedmq.aggregator.strategies import STRATEGIES
from fedmq.aggregator.tracking import check_tracker
from fedmq.shared.chunking import DEFAULT_CHUNK_BYTES, MIN_CHUNK_BYTES
from fedmq.shared.defaults import DEFAULT_TRAINER
from fedmq.shared.errors import ConfigError


@dataclass(frozen=True)
class AggregatorConfig:
    test_data: str
    out: str
    mode: str = "sync"
    strategy: str | None = None  # default: fedavg for sync, fedbuff for async
    rounds: int | None = None  # sync: default 20
    max_updates: int | None = None  # async: default 200 when nothing else stops the run
    target_accuracy: float | None = None
    time_limit: float | None = None
    workers_per_round: int | None = None  # default: every live worker
    min_workers: int = 1
    join_grace: float = field(default=5.0, metadata={"help": (
        "Seconds to wait for more workers once --min-workers are live, before the first round "
        "(sync) or task (async); each new worker restarts the wait, up to 3x this in all.")})
    round_timeout: float = 60.0
    concurrency: int | None = None  # async tasks outstanding; default: live workers
    buffer_size: int = 3
    mixing: float = 0.6
    staleness: str = "polynomial"
    staleness_a: float | None = None
    staleness_b: float | None = None
    max_staleness: int | None = None
    server_lr: float = 1.0
    hidden: tuple[int, ...] = (64,)
    activation: str = "relu"
    loss: str = "cross-entropy"
    epochs: int = 2
    batch_size: int = 32
    lr: float = 0.1
    proximal_mu: float = 0.0
    seed: int = 0
    trainer: str = DEFAULT_TRAINER
    resume: bool = False
    checkpoint_every: int = 10
    checkpoint_interval: float = 5.0
    task_timeout: float = 300.0
    task_retries: int = field(default=2, metadata={"help": (
        "Sync: replacement tasks a task of a round gets when workers report it failed; a round "
        "that can then no longer get --min-workers updates stops the run (exit 1).")})
    drain_timeout: float = 10.0
    max_update_bytes: int | None = None
    chunk_bytes: int = field(default=DEFAULT_CHUNK_BYTES, metadata={"help": (
        "Models larger than this travel as chunks of this many bytes (each one message; RabbitMQ 4 "
        "refuses messages over 16 MiB by default); smaller ones as one message.")})
    consumer_timeout: float = field(default=86400.0, metadata={"help": (
        "Seconds RabbitMQ (3.12+, 4.x) lets the aggregator hold an update unacked before it closes the "
        "channel (x-consumer-timeout on its consumer; the broker's own default is 30 min).")})
    chunk_timeout: float = field(default=120.0, metadata={"help": (
        "Seconds a chunked update may go without a new chunk before its chunks are settled and it "
        "is recorded 'incomplete' (never applied).")})
    presence_timeout: float = 20.0
    track: str | None = field(default=None, metadata={"help": (
        "Experiment tracking: tensorboard (RUN_DIR/tensorboard) or mlflow (--track-uri, default "
        "RUN_DIR/mlruns); needs the fedmq[tensorboard] or fedmq[mlflow] extra.")})
    track_uri: str | None = field(default=None, metadata={"help": "MLflow tracking URI (default: a file store in RUN_DIR/mlruns)."})
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def strategy_name(self) -> str:
        return self.strategy or ("fedavg" if self.mode == "sync" else "fedbuff")

    @property
    def synchronous(self) -> bool:
        return self.mode == "sync"

    def validate(self) -> AggregatorConfig:
        check_tracker(self.track)
        if self.mode not in ("sync", "async"):
            raise ConfigError(f"--mode must be sync or async, got {self.mode!r}")
        if self.strategy_name not in STRATEGIES:
            raise ConfigError(f"unknown strategy {self.strategy_name!r}; choose one of {', '.join(STRATEGIES)}")
        if self.synchronous != (self.strategy_name == "fedavg"):
            raise ConfigError(
                f"strategy {self.strategy_name} does not run in {self.mode} mode "
                "(fedavg is synchronous; fedasync and fedbuff are asynchronous)"
            )
        positive = {
            "rounds": self.rounds, "max_updates": self.max_updates, "time_limit": self.time_limit,
            "workers_per_round": self.workers_per_round, "concurrency": self.concurrency,
            "buffer_size": self.buffer_size, "epochs": self.epochs, "batch_size": self.batch_size,
            "lr": self.lr, "min_workers": self.min_workers, "round_timeout": self.round_timeout,
            "checkpoint_every": self.checkpoint_every, "server_lr": self.server_lr,
        }
        for name, value in positive.items():
            if value is not None and value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.target_accuracy is not None and not 0 < self.target_accuracy <= 1:
            raise ConfigError(f"--target-accuracy must be in (0, 1], got {self.target_accuracy}")
        if self.max_staleness is not None and self.max_staleness < 0:
            raise ConfigError(f"--max-staleness must be >= 0, got {self.max_staleness}")
        if self.join_grace < 0:
            raise ConfigError(f"--join-grace must be >= 0, got {self.join_grace}")
        if self.task_retries < 0:
            raise ConfigError(f"--task-retries must be >= 0, got {self.task_retries}")
        if self.chunk_bytes < MIN_CHUNK_BYTES:
            raise ConfigError(f"--chunk-bytes must be at least {MIN_CHUNK_BYTES}, got {self.chunk_bytes}")
        if self.consumer_timeout <= 0:
            raise ConfigError(f"--consumer-timeout must be positive, got {self.consumer_timeout}")
        if self.chunk_timeout <= 0:
            raise ConfigError(f"--chunk-timeout must be positive, got {self.chunk_timeout}")
        if self.proximal_mu < 0:
            raise ConfigError(f"--proximal-mu must be >= 0, got {self.proximal_mu}")
        if not self.hidden or any(h <= 0 for h in self.hidden):
            raise ConfigError(f"--hidden must be positive layer sizes, got {self.hidden}")
        if self.workers_per_round is not None and self.workers_per_round < self.min_workers:
            raise ConfigError("--workers-per-round must be at least --min-workers")
        return self

    @property
    def effective_rounds(self) -> int | None:
        if self.rounds is not None:
            return self.rounds
        if self.synchronous and not (self.max_updates or self.target_accuracy or self.time_limit):
            return 20
        return None

    @property
    def effective_max_updates(self) -> int | None:
        if self.max_updates is not None:
            return self.max_updates
        if not self.synchronous and not (self.rounds or self.target_accuracy or self.time_limit):
            return 200
        return None

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["hidden"] = list(self.hidden)
        doc["strategy"] = self.strategy_name
        return doc
