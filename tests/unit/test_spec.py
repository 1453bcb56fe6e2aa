"""The trainer owns its model: --trainer-config, [trainer], spec_from, and data that keeps its shape."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from fedmq.cli import main
from fedmq.options import aggregator_argv, aggregator_config
from fedmq.shared.data import load_dataset, load_shard
from fedmq.shared.errors import ConfigError, DataError
from fedmq.shared.spec import (
    build_spec,
    config_pairs,
    make_trainer,
    parse_trainer_config,
    resolve_ref,
    run_trainer_config,
)
from fedmq.shared.split import split_dataset
from fedmq.shared.trainer import MLPTrainer, mlp_spec
from fedmq.worker.task import misfit

MLP_OPTIONS = {"hidden": [64], "activation": "relu", "loss": "cross-entropy"}


def parse(command: str, args: list[str]) -> dict[str, Any]:
    ctx = main.commands[command].make_context(command, list(args), auto_envvar_prefix=f"FEDMQ_{command.upper()}")
    return dict(ctx.params)


def test_trainer_config_values_are_json_where_they_parse_and_text_otherwise() -> None:
    got = parse_trainer_config(["lr=0.1", "hidden=[64, 32]", "module=pkg.mod:make", "flag=true",
                                "text=\"a b\"", "pair=64,32", "kw={\"momentum\": 0.9}", "empty="])
    assert got == {"lr": 0.1, "hidden": [64, 32], "module": "pkg.mod:make", "flag": True, "text": "a b",
                   "pair": "64,32", "kw": {"momentum": 0.9}, "empty": ""}
    for bad in ("novalue", "=3"):
        with pytest.raises(ConfigError, match="KEY=VALUE"):
            parse_trainer_config([bad])


def test_a_toml_table_becomes_pairs_that_read_back_the_same() -> None:
    table = {"module": "m:f", "module_kwargs": {"channels": 8}, "hidden": [64, 32], "lr": 0.5, "ok": False}
    assert parse_trainer_config(config_pairs(table)) == table


def test_the_mlp_builds_its_spec_from_its_config_and_the_data() -> None:
    spec = build_spec(MLPTrainer, run_trainer_config(MLPTrainer, ["hidden=32,16"], device="auto",
                                                     mlp_options=MLP_OPTIONS),
                      input_shape=(1, 8, 8), num_classes=10, seed=3)
    assert spec == mlp_spec(64, 10, hidden=[32, 16], activation="relu", loss="cross-entropy", seed=3)
    # --hidden/--activation/--loss are the MLP's keys; a --trainer-config pair wins over them
    spec = build_spec(MLPTrainer, run_trainer_config(MLPTrainer, [], device="cpu",
                                                     mlp_options={**MLP_OPTIONS, "activation": "tanh"}),
                      input_shape=(4,), num_classes=2, seed=0)
    assert (spec["activation"], spec["hidden"], spec["input_dim"]) == ("tanh", [64], 4)


@pytest.mark.parametrize(
    ("pairs", "device", "match"),
    [
        (["colour=red"], "auto", "unknown --trainer-config key 'colour' for the numpy MLP.*its keys are activation"),
        (["hidden=a,b"], "auto", "hidden must be layer sizes"),
        (["activation=swish"], "auto", "unknown activation 'swish'"),
        (["momentum=2"], "auto", "'momentum' must be a number in"),
        ([], "cuda", "the numpy MLP runs on cpu only, not --device cuda"),
    ],
)
def test_bad_mlp_configs_name_the_key(pairs: list[str], device: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_spec(MLPTrainer, run_trainer_config(MLPTrainer, pairs, device=device, mlp_options=MLP_OPTIONS),
                   input_shape=(4,), num_classes=2, seed=0)


def test_the_benchmarks_stand_in_still_gets_an_mlp_spec_from_hidden() -> None:
    from bench.standin import NoiseTrainer

    config = run_trainer_config(NoiseTrainer, [], device="auto", mlp_options={**MLP_OPTIONS, "hidden": [5]})
    spec = build_spec(NoiseTrainer, config, input_shape=(64,), num_classes=10, seed=0)
    assert NoiseTrainer(spec).layers == (64, 5, 10)


def test_a_factory_without_spec_from_gets_the_data_and_its_config() -> None:
    def factory(spec: dict) -> Any:
        return spec

    config = run_trainer_config(factory, ["width=3"], device="cuda", mlp_options=MLP_OPTIONS)
    assert config == {"device": "cuda", "width": 3}  # the MLP's options are not its keys
    spec = build_spec(factory, config, input_shape=(1, 8, 8), num_classes=10, seed=2)
    assert spec == {"input_shape": [1, 8, 8], "num_classes": 10, "seed": 2, "device": "cuda", "width": 3}


def test_whatever_a_users_factory_raises_is_one_config_error_line() -> None:
    class Picky:
        @classmethod
        def spec_from(cls, config: dict, **_: Any) -> dict:
            raise ValueError("l2 must be >= 0")

        def __init__(self, spec: dict) -> None:
            raise KeyError("width")

    with pytest.raises(ConfigError, match="rejected its --trainer-config: ValueError: l2 must be >= 0"):
        build_spec(Picky, {"l2": -1}, input_shape=(4,), num_classes=2, seed=0)
    with pytest.raises(ConfigError, match="cannot be built from its spec: KeyError: 'width'"):
        make_trainer(Picky, {})


def test_references_may_name_a_python_file(tmp_path: Path) -> None:
    (tmp_path / "my-model.py").write_text("def make():\n    return 42\n")
    assert resolve_ref(f"{tmp_path}/my-model.py:make", "model")() == 42
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_ref(f"{tmp_path}/missing.py:make", "model")


def test_trainer_config_reaches_the_aggregator_from_flags_and_from_a_trainer_table(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("FEDMQ_")]:
        monkeypatch.delenv(key)
    p = parse("run", ["--out", "r", "--trainer-config", "module=m:f", "--trainer-config", "lr=0.5", "--device", "cpu"])
    assert p["trainer_config"] == ("module=m:f", "lr=0.5") and p["device"] == "cpu"
    argv = aggregator_argv(p)
    assert argv[argv.index("--trainer-config"):argv.index("--trainer-config") + 4] == \
        ["--trainer-config", "module=m:f", "--trainer-config", "lr=0.5"]
    agg = parse("aggregator", ["--test-data", "t", "--out", "r", *argv])
    assert agg["trainer_config"] == p["trainer_config"]
    cfg = tmp_path / "fedmq.toml"
    # (TOML allows no top-level `trainer` key beside a [trainer] table: --trainer goes in [aggregator])
    cfg.write_text("[aggregator]\ntrainer = 'fedmq.torch:TorchTrainer'\n[trainer]\nmodule = 'model.py:make_cnn'\n"
                   "module_kwargs = {channels = 8}\n[worker]\nheartbeat = 2.0\n")
    for command, extra in (("run", []), ("aggregator", ["--test-data", "t"])):
        p = parse(command, ["--config", str(cfg), "--out", "r", *extra])
        assert p["trainer"] == "fedmq.torch:TorchTrainer"
        assert parse_trainer_config(p["trainer_config"]) == {"module": "model.py:make_cnn",
                                                             "module_kwargs": {"channels": 8}}
        assert aggregator_config(p, test_data="t", out="r").trainer_config == p["trainer_config"]
    # a worker reading the same file skips the [trainer] table: its spec comes with the model
    assert parse("worker", ["--config", str(cfg), "--data", "x.npz"])["heartbeat"] == 2.0


def test_bad_device_and_export_values_are_usage_errors() -> None:
    for args in (["--device", "tpu"], ["--export", "onnx"]):
        result = CliRunner().invoke(main, ["run", "--out", "r", *args])
        assert result.exit_code == 2 and "Invalid value" in result.output, result.output
    with pytest.raises(ConfigError, match="--device"):
        aggregator_config({}, test_data="t", out="r", device="tpu")


# ---------------------------------------------------------------------------------------- data


def test_digits_as_images_keep_their_shape_through_split_and_shards(tmp_path: Path) -> None:
    flat = load_dataset("digits")
    images = load_dataset("digits", image=True)
    assert images.X_train.shape[1:] == (1, 8, 8) and images.sample_shape == (1, 8, 8)
    assert images.num_features == flat.num_features == 64
    np.testing.assert_array_equal(images.X_train.reshape(len(images.X_train), -1), flat.X_train)
    manifest = split_dataset(images, tmp_path, num_workers=3, method="dirichlet", alpha=0.5, seed=1)
    assert manifest["sample_shape"] == [1, 8, 8]
    X, y = load_shard(str(tmp_path / "worker-0.npz"))
    assert X.shape[1:] == (1, 8, 8) and X.dtype == np.float32 and len(y) == len(X)
    assert load_shard(str(tmp_path / "test.npz"))[0].shape[1:] == (1, 8, 8)


def test_a_file_keeps_the_rank_it_is_saved_with(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "vol.npz"
    np.savez(path, X=rng.standard_normal((40, 2, 3, 4)), y=rng.integers(0, 2, 40))
    ds = load_dataset(path=str(path))
    assert ds.X_train.shape[1:] == (2, 3, 4)
    with pytest.raises(DataError, match="has no images"):
        load_dataset("iris", image=True)
    with pytest.raises(DataError, match="keeps the shape it is saved with"):
        load_dataset(path=str(path), image=True)


def test_a_shard_whose_samples_do_not_have_the_models_shape_is_a_misfit_naming_both() -> None:
    X, y = np.zeros((4, 1, 8, 8), np.float32), np.array([0, 1, 2, 3])
    vector = {"input_shape": [64], "num_classes": 10, "trainer": "fedmq.torch:TorchTrainer"}
    reason = misfit(vector, X, y, "fedmq.torch:TorchTrainer")
    assert reason == "the shard's samples have shape (1, 8, 8), the model takes samples of shape (64,)"
    assert misfit({**vector, "input_shape": [1, 8, 8]}, X, y, "fedmq.torch:TorchTrainer") is None
    # the numpy MLP flattens: images of 64 pixels fit a model of 64 inputs
    assert misfit(mlp_spec(64, 10), X, y, None) is None
    assert "64 features per sample, the model takes 63" in misfit(mlp_spec(63, 10), X, y, None)


def test_data_split_image_writes_image_shards(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["data", "split", "--dataset", "digits", "--image", "--workers", "2",
                                       "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert load_shard(str(tmp_path / "worker-1.npz"))[0].shape[1:] == (1, 8, 8)


def test_a_file_module_loaded_by_many_threads_at_once_is_whole_for_each(tmp_path: Path) -> None:
    """Pooled workers take their first task together and each loads the model file: the module
    is in sys.modules before its body has run, and a second thread got it half made ("model
    module ... has no attribute 'make_cnn'", seen in the PyTorch example's async run)."""
    import threading

    from fedmq.shared.spec import resolve_ref

    module = tmp_path / "slow_model.py"
    module.write_text("import time\ntime.sleep(0.3)  # a heavy import (torch)\n\ndef make():\n    return 42\n")
    got: list[object] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def load() -> None:
        start.wait()
        try:
            got.append(resolve_ref(f"{module}:make", "model")())
        except BaseException as exc:  # noqa: BLE001 (collected for the assertion)
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert got == [42] * 8
