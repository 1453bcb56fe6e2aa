"""The aggregator's settings: one frozen dataclass, validated once, recorded in history.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from fedmq.aggregator.privacy import GaussianDP, check_accountant, make_dp
from fedmq.aggregator.robust import RobustRule, make_robust
from fedmq.aggregator.strategies import STRATEGIES, check_defences
from fedmq.aggregator.tracking import check_tracker
from fedmq.shared.chunking import DEFAULT_CHUNK_BYTES, MIN_CHUNK_BYTES
from fedmq.shared.compression import MODEL_DTYPES, Scheme
from fedmq.shared.compression import parse as parse_compression
from fedmq.shared.defaults import DEFAULT_TRAINER
from fedmq.shared.errors import ConfigError
from fedmq.shared.memory import parse_budget


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
    trainer_config: tuple[str, ...] = field(default=(), metadata={"help": (
        "KEY=VALUE for the trainer (repeat it; or a [trainer] table in --config), e.g. "
        "module=model.py:make_cnn for fedmq.torch:TorchTrainer; an unknown key is an error.")})
    device: str = field(default="auto", metadata={"help": (
        "Where trainers that can use a GPU train and evaluate: cpu, cuda (fails where there is "
        "none) or auto (a GPU where there is one).")})
    export: str | None = field(default=None, metadata={"help": (
        "Also write the final model as RUN_DIR/model.safetensors (and, for PyTorch trainers, a "
        "state_dict in RUN_DIR/model.pt); needs the safetensors package.")})
    resume: bool = False
    require_user_id: bool = field(default=False, metadata={"help": (
        "Count only updates that carry the broker-validated user_id of their publisher, and bind "
        "each worker id to the first user that used it; others are dead-lettered with the reason. "
        "Needs one broker user per worker, none with the impersonator tag.")})
    standby: bool = field(default=False, metadata={"help": (
        "Wait as a standby while another aggregator runs this namespace, and take the run over "
        "(from the newest checkpoint in --out, as --resume) when it stops or dies.")})
    checkpoint_every: int = 10
    checkpoint_interval: float = 5.0
    issued_memory: int | None = field(default=None, metadata={"help": (
        "Async: task ids remembered besides the outstanding ones (default 4096); an answer to an "
        "older one is rejected, so the checkpoint's settled task ids stay bounded. Must exceed what "
        "can still be in flight (concurrency plus unacked redeliveries).")})
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
    memory_budget: str = field(default="auto", metadata={"help": (
        "Refuse at start a model this process cannot hold: a size (8G, 512M), auto (the memory "
        "available to it) or off. The need is a multiple of the model's size that depends on the "
        "strategy (README, 'Large models').")})
    track: str | None = field(default=None, metadata={"help": (
        "Experiment tracking: tensorboard (RUN_DIR/tensorboard) or mlflow (--track-uri, default "
        "RUN_DIR/mlruns); needs the fedmq[tensorboard] or fedmq[mlflow] extra.")})
    track_uri: str | None = field(default=None, metadata={"help": "MLflow tracking URI (default: a file store in RUN_DIR/mlruns)."})
    signing_key: str | None = field(default=None, metadata={"help": (
        "Ed25519 private key (PEM, from `fedmq keys generate`): sign every model, task and stop; "
        "workers verify them with --aggregator-key.")})
    worker_keys: str | None = field(default=None, metadata={"help": (
        "Directory of <worker id>.pub public keys: accept only updates and reports signed by the "
        "worker they name, for this run; others are rejected (dead-lettered with the reason).")})
    robust: str = field(default="none", metadata={"help": (
        "Robust aggregation: none, trimmed-mean (--trim-fraction), median, multi-krum (--byzantine) or "
        "norm-clip (--clip-norm); sync: over each round's updates; fedbuff: over each buffer; "
        "fedasync: norm-clip only, against recent updates.")})
    trim_fraction: float = field(default=0.1, metadata={"help": (
        "trimmed-mean: drop this fraction of the largest and of the smallest values of every coordinate.")})
    byzantine: int = field(default=1, metadata={"help": (
        "multi-krum: f, the attackers to tolerate (needs at least 2f+3 updates per round or buffer).")})
    clip_norm: float | None = field(default=None, metadata={"help": (
        "norm-clip: the L2 bound of each delta (default: adaptive, the median norm of the round's, "
        "buffer's or recent updates).")})
    dp_clip: float | None = field(default=None, metadata={"help": (
        "Differential privacy (fedavg, fedbuff): clip each delta to this L2 norm S.")})
    dp_noise: float = field(default=0.0, metadata={"help": (
        "Differential privacy: noise multiplier z; N(0, (z*S/n)^2) is added to each average of n "
        "clipped deltas (0: off). Needs the fedmq[dp] extra.")})
    dp_delta: float = field(default=1e-5, metadata={"help": "Differential privacy: the delta of the (epsilon, delta) reported."})
    compress: str = field(default="none", metadata={"help": (
        "Compress the workers' updates: none, fp16, int8 (a scale per 1024 values) or topk:FRACTION "
        "(the largest entries of each layer, the rest kept on the worker as error feedback). "
        "Updates then carry deltas; fedavg and fedbuff only.")})
    model_dtype: str = field(default="float32", metadata={"help": (
        "How model versions travel to the workers: float32; bfloat16 (half the bytes, relative "
        "rounding <= 2**-8); or int8 (a quarter of the bytes, a scale per 1024 weights, error <= "
        "1/254 of the block's largest). The aggregator keeps and checkpoints float32, workers train on "
        "the rounded model and send deltas from it. fedavg and fedbuff only.")})
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
            "issued_memory": self.issued_memory,
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
        parse_budget(self.memory_budget)
        if self.chunk_timeout <= 0:
            raise ConfigError(f"--chunk-timeout must be positive, got {self.chunk_timeout}")
        if self.proximal_mu < 0:
            raise ConfigError(f"--proximal-mu must be >= 0, got {self.proximal_mu}")
        if not self.hidden or any(h <= 0 for h in self.hidden):
            raise ConfigError(f"--hidden must be positive layer sizes, got {self.hidden}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.export not in (None, "safetensors"):
            raise ConfigError(f"--export must be safetensors, got {self.export!r}")
        if self.workers_per_round is not None and self.workers_per_round < self.min_workers:
            raise ConfigError("--workers-per-round must be at least --min-workers")
        self._check_defences()
        scheme = self.compression()
        if scheme.lossy and self.strategy_name == "fedasync":
            raise ConfigError(f"--compress {scheme.text} works with fedavg and fedbuff, not fedasync (a compressed "
                              "update is a delta from its base version, which fedasync no longer holds)")
        if self.model_dtype not in MODEL_DTYPES:
            raise ConfigError(f"--model-dtype must be one of {', '.join(MODEL_DTYPES)}, got {self.model_dtype!r}")
        if self.model_dtype != "float32" and self.strategy_name == "fedasync":
            raise ConfigError(f"--model-dtype {self.model_dtype} works with fedavg and fedbuff, not fedasync (workers "
                              "send deltas from the rounded model, and fedasync mixes weights)")
        return self

    def compression(self) -> Scheme:
        """The --compress scheme (ConfigError for one that does not parse)."""
        try:
            return parse_compression(self.compress)
        except ValueError as exc:
            raise ConfigError(f"--compress: {exc}") from None

    def robust_rule(self) -> RobustRule:
        """The --robust rule with its parameters (ConfigError for impossible ones)."""
        clip = self.clip_norm
        if clip is not None and clip <= 0:
            raise ConfigError(f"--clip-norm must be positive (leave it out for the adaptive clip), got {clip}")
        return make_robust(self.robust, trim_fraction=self.trim_fraction, byzantine=self.byzantine, clip_norm=clip)

    def dp_mechanism(self) -> GaussianDP | None:
        """The Gaussian mechanism of --dp-clip/--dp-noise/--dp-delta; None when --dp-noise is 0."""
        return make_dp(self.dp_clip, self.dp_noise, self.dp_delta, self.seed)

    def _check_defences(self) -> None:
        """Robust rules and DP that cannot work with this strategy, or with this few updates per
        round (sync: a round may close with --min-workers) or buffer (fedbuff: --buffer-size)."""
        rule, dp = self.robust_rule(), self.dp_mechanism()
        check_defences(self.strategy_name, rule, dp)
        if rule.needs_all or (rule.name == "norm-clip" and self.synchronous):
            if self.synchronous:
                rule.check(self.min_workers, given="--min-workers")
            elif self.strategy_name == "fedbuff":
                rule.check(self.buffer_size, given="--buffer-size")
        if dp is not None:
            check_accountant()

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
        doc["trainer_config"] = list(self.trainer_config)
        doc["strategy"] = self.strategy_name
        return doc
