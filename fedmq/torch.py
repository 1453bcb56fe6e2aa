"""PyTorch models as fedmq trainers: :class:`TorchTrainer` turns any ``torch.nn.Module`` factory
into a :class:`~fedmq.shared.trainer.Trainer`.

Needs the ``fedmq[torch]`` extra; fedmq imports this module only when a run names it
(``--trainer fedmq.torch:TorchTrainer``). Its ``--trainer-config`` keys (or ``[trainer]`` table):

``module`` (required)
    ``package.module:attr`` or ``path/to/file.py:attr``: an ``nn.Module`` class or a function
    returning one. It is called with ``module_kwargs``, and with ``num_classes`` and
    ``input_shape`` where its signature takes them and ``module_kwargs`` does not give them.
``module_kwargs``
    A JSON object of keyword arguments for it (default ``{}``).
``loss``
    ``cross-entropy`` (default; the module outputs logits), ``nll`` (it outputs log-probabilities)
    or a ``module:attr`` reference to a loss class or function (called without arguments, the
    result called as ``loss(outputs, targets)`` giving the batch mean).
``optimizer``, ``optimizer_kwargs``
    ``sgd`` (default), ``adam``, ``adamw`` or ``rmsprop``, and a JSON object of its settings
    other than ``lr`` (e.g. ``{"momentum": 0.9}``); the learning rate is the task's ``--lr``.
``seed``
    Initialisation seed (default ``--seed``); training seeds come with each task.
``device``
    ``auto`` (default: a GPU where PyTorch finds one), ``cpu`` or ``cuda`` (``--device``).

Parameters and buffers (the whole ``state_dict``, e.g. BatchNorm running statistics) travel as
float32 under their ``state_dict`` names, whatever the module's dtypes: the strategies average
buffers like weights (running means and variances are weighted by samples like the weights;
``num_batches_tracked`` is averaged too and rounded back to an integer when loaded). On the CPU a
float32 module's tensors and the arrays share memory both ways (:func:`state_dict_to_arrays`,
:func:`arrays_to_state_dict`); ``fit`` copies its input once, so that it never changes the
caller's arrays, and returns arrays that share the trained tensors' memory.
"""

from __future__ import annotations

import inspect
import io
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from fedmq.shared.errors import ConfigError
from fedmq.shared.spec import DEVICE_KEY, check_device, check_keys, resolve_ref
from fedmq.shared.trainer import FitResult

TRAINER = "fedmq.torch:TorchTrainer"
CONFIG_KEYS = ("module", "module_kwargs", "loss", "optimizer", "optimizer_kwargs", "seed", DEVICE_KEY)
SPEC_KEYS = (*CONFIG_KEYS, "input_shape", "num_classes")
OPTIMIZERS: dict[str, str] = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "rmsprop": "RMSprop"}
LOSSES = ("cross-entropy", "nll")
WIRE_DTYPE = np.dtype(np.float32)
#: samples per forward pass when evaluating
EVAL_BATCH = 1024


# ---------------------------------------------------------------------------------------
# state_dict <-> name -> array
# ---------------------------------------------------------------------------------------


def state_dict_to_arrays(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """A ``state_dict`` as fedmq parameters: name -> float32 array, in the state_dict's order.

    A float32 tensor on the CPU becomes a view of the same memory (no copy); other dtypes and
    devices are converted.
    """
    out: dict[str, np.ndarray] = {}
    for name, tensor in state.items():
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if t.dtype != torch.float32:
            t = t.to(torch.float32)
        out[name] = t.numpy()
    return out


def arrays_to_state_dict(arrays: Mapping[str, np.ndarray], template: Mapping[str, torch.Tensor], *,
                         device: torch.device | str = "cpu", copy: bool = False) -> dict[str, torch.Tensor]:
    """fedmq parameters as a ``state_dict`` with the names, dtypes and shapes of ``template``.

    ``copy=False``: a float32 array for a float32 tensor on the CPU is shared, not copied (the
    tensor is read-only in spirit where the array is); ``copy=True`` gives tensors of their own.
    Integer buffers (``num_batches_tracked``) are rounded. ConfigError names a missing,
    unexpected or misshapen entry.
    """
    missing = [k for k in template if k not in arrays]
    extra = [k for k in arrays if k not in template]
    if missing or extra:
        raise ConfigError(f"parameters do not match the module's state_dict: missing {missing}, unexpected {extra}")
    state: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")  # decoded arrays are read-only
        for name, like in template.items():
            arr = np.asarray(arrays[name])
            if tuple(arr.shape) != tuple(like.shape):
                raise ConfigError(f"parameter {name!r} has shape {tuple(arr.shape)}, the module's is {tuple(like.shape)}")
            if not (like.dtype.is_floating_point or like.dtype.is_complex):
                arr = np.asarray(np.rint(arr))
            elif copy:
                arr = np.array(arr, copy=True)
            tensor = torch.from_numpy(arr)
            state[name] = tensor.to(device=device, dtype=like.dtype)
    return state


# ---------------------------------------------------------------------------------------
# Devices, modules, losses, optimizers
# ---------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` (ConfigError where PyTorch finds no GPU) or ``auto`` (a GPU if any)."""
    check_device(name, "PyTorch")
    if name == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if name == "cuda":
        raise ConfigError(
            f"--device cuda: PyTorch {torch.__version__} finds no CUDA GPU on this machine "
            "(torch.cuda.is_available() is False); use --device cpu or auto"
        )
    return torch.device("cpu")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def build_module(ref: str, kwargs: Mapping[str, Any], *, input_shape: tuple[int, ...], num_classes: int,
                 seed: int) -> nn.Module:
    """The module ``ref`` makes, built under ``seed`` (the global RNG is left as it was)."""
    factory = resolve_ref(ref, "model")
    if not callable(factory):
        raise ConfigError(f"module factory {ref!r} is a {type(factory).__name__}, not a class or function")
    call = dict(kwargs)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    for key, value in (("num_classes", num_classes), ("input_shape", tuple(input_shape))):
        if key in params and key not in call:
            call[key] = value
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            module = factory(**call)
        except Exception as exc:  # the user's factory may raise anything
            raise ConfigError(f"module factory {ref!r} raised {_first_line(exc)}") from None
    if not isinstance(module, nn.Module):
        raise ConfigError(f"module factory {ref!r} returned {type(module).__name__}, not a torch.nn.Module")
    return module


def check_module(module: nn.Module, ref: str, input_shape: tuple[int, ...], num_classes: int,
                 device: torch.device) -> None:
    """ConfigError unless ``module`` maps a batch of samples of ``input_shape`` to ``num_classes``
    outputs each (one line naming both shapes)."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(torch.zeros((2, *input_shape), dtype=_float_dtype(module), device=device))
    except Exception as exc:  # a shape mismatch raises RuntimeError, others anything
        raise ConfigError(
            f"module {ref!r} cannot take the data's samples of shape {tuple(input_shape)}: {_first_line(exc)}"
        ) from None
    finally:
        module.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise ConfigError(f"module {ref!r} returned {type(out).__name__}, not a tensor of class scores")
    if tuple(out.shape) != (2, num_classes):
        raise ConfigError(
            f"module {ref!r} maps the data's samples of shape {tuple(input_shape)} to outputs of shape "
            f"{tuple(out.shape[1:])}; the data has {num_classes} classes, so it must output ({num_classes},) per sample"
        )


def _float_dtype(module: nn.Module) -> torch.dtype:
    for p in module.parameters():
        if p.dtype.is_floating_point:
            return p.dtype
    return torch.float32


def make_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss a spec names (see the module doc)."""
    if name == "cross-entropy":
        return nn.CrossEntropyLoss()
    if name == "nll":
        return nn.NLLLoss()
    if isinstance(name, str) and ":" in name:
        factory = resolve_ref(name, "loss")
        try:
            loss = factory() if isinstance(factory, type) else factory
        except Exception as exc:
            raise ConfigError(f"loss {name!r} raised {_first_line(exc)}") from None
        if not callable(loss):
            raise ConfigError(f"loss {name!r} is not callable")
        return loss
    raise ConfigError(f"unknown loss {name!r}; use {', '.join(LOSSES)} or a module:attr reference")


def make_optimizer(name: str, kwargs: Mapping[str, Any], params: Any, lr: float) -> torch.optim.Optimizer:
    """The optimizer a spec names over ``params`` at learning rate ``lr``."""
    cls = getattr(torch.optim, OPTIMIZERS[name])
    return cls(params, lr=lr, **dict(kwargs))


# ---------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------


def _object(spec: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = spec.get(key, {})
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"--trainer-config {key} must be a JSON object like {{\"a\": 1}}, got {value!r}")
    return dict(value)


class TorchTrainer:
    """A fedmq trainer around the ``nn.Module`` a factory makes (see the module doc)."""

    @classmethod
    def spec_from(cls, config: dict, *, input_shape: tuple[int, ...], num_classes: int, seed: int) -> dict:
        """The spec of a run: the configuration, its defaults, and the data's sample shape and classes."""
        check_keys(config, CONFIG_KEYS, TRAINER, required=("module",))
        return {
            "module": config["module"],
            "module_kwargs": config.get("module_kwargs", {}),
            "loss": config.get("loss", "cross-entropy"),
            "optimizer": config.get("optimizer", "sgd"),
            "optimizer_kwargs": config.get("optimizer_kwargs", {}),
            "seed": config.get("seed", seed),
            DEVICE_KEY: config.get(DEVICE_KEY, "auto"),
            "input_shape": [int(n) for n in input_shape],
            "num_classes": int(num_classes),
        }

    def __init__(self, spec: dict) -> None:
        check_keys(spec, SPEC_KEYS, TRAINER, required=("module", "input_shape", "num_classes"))
        self.spec = spec
        ref = spec["module"]
        if not isinstance(ref, str):
            raise ConfigError(f"--trainer-config module must be a 'module:attr' reference, got {ref!r}")
        shape, classes, seed = spec["input_shape"], spec["num_classes"], spec.get("seed", 0)
        if not isinstance(shape, list) or not all(isinstance(n, int) and n > 0 for n in shape):
            raise ConfigError(f"spec input_shape must be a list of positive integers, got {shape!r}")
        if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
            raise ConfigError(f"spec num_classes must be a positive integer, got {classes!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"--trainer-config seed must be a non-negative integer, got {seed!r}")
        self.input_shape, self.num_classes, self.seed = tuple(shape), classes, seed
        optimizer = spec.get("optimizer", "sgd")
        if optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
        self.optimizer, self.optimizer_kwargs = optimizer, _object(spec, "optimizer_kwargs")
        if "lr" in self.optimizer_kwargs:
            raise ConfigError("optimizer_kwargs must not set lr: the learning rate is the run's --lr")
        self.loss = make_loss(spec.get("loss", "cross-entropy"))
        self.device = resolve_device(spec.get(DEVICE_KEY, "auto"))
        module = build_module(ref, _object(spec, "module_kwargs"), input_shape=self.input_shape,
                              num_classes=classes, seed=seed)
        module.to(self.device)
        check_module(module, ref, self.input_shape, classes, self.device)
        self.module = module
        self._template = {k: v.detach().clone() for k, v in module.state_dict().items()}
        self._initial = {k: np.array(v, copy=True) for k, v in state_dict_to_arrays(module.state_dict()).items()}
        try:
            make_optimizer(self.optimizer, self.optimizer_kwargs, [nn.Parameter(torch.zeros(1))], 0.1)
        except Exception as exc:
            raise ConfigError(f"optimizer {optimizer!r} does not take {self.optimizer_kwargs}: {_first_line(exc)}") from None

    # ------------------------------------------------------------------ Trainer protocol
    def init_params(self) -> dict[str, np.ndarray]:
        """The module's initial state_dict as built under the spec's seed (float32 copies)."""
        return {k: v.copy() for k, v in self._initial.items()}

    def _load(self, params: Mapping[str, np.ndarray], *, copy: bool) -> None:
        state = arrays_to_state_dict(params, self._template, device=self.device, copy=copy)
        self.module.load_state_dict(state, assign=True)

    def _tensors(self, X: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if tuple(X.shape[1:]) != self.input_shape:
            raise ConfigError(f"samples of shape {tuple(X.shape[1:])}, the module takes {self.input_shape}")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not writable.*")
            Xt = torch.from_numpy(np.asarray(X)).to(self.device, _float_dtype(self.module))
            yt = torch.from_numpy(np.asarray(y)).to(self.device, torch.long)
        return Xt, yt

    def fit(self, params: dict[str, np.ndarray], X: np.ndarray, y: np.ndarray, *, epochs: int,
            batch_size: int, lr: float, mu: float = 0.0, seed: int = 0) -> FitResult:
        """``epochs`` passes of mini-batch training from ``params``, with the FedProx term
        ``mu/2 * ||w - params||^2`` over the module's parameters when ``mu > 0``."""
        self._load(params, copy=True)  # tensors of our own: the caller's arrays stay as they are
        module = self.module
        Xt, yt = self._tensors(X, y)
        n = int(Xt.shape[0])
        reference = [p.detach().clone() for p in module.parameters()] if mu > 0 else []
        torch.manual_seed(seed)  # dropout and other random layers
        order = torch.Generator().manual_seed(seed)
        optimizer = make_optimizer(self.optimizer, self.optimizer_kwargs, module.parameters(), lr)
        module.train()
        for _ in range(epochs):
            perm = torch.randperm(n, generator=order).to(self.device)
            for start in range(0, n, batch_size):
                idx = perm[start:start + batch_size]
                if idx.numel() < 2 and n >= 2 and _has_batchnorm(module):
                    continue  # BatchNorm cannot train on one sample
                optimizer.zero_grad(set_to_none=True)
                loss = self.loss(module(Xt[idx]), yt[idx])
                if mu > 0:
                    prox = sum(((p - r) ** 2).sum() for p, r in zip(module.parameters(), reference, strict=True))
                    loss = loss + 0.5 * mu * prox
                loss.backward()
                optimizer.step()
        train_loss, train_accuracy = self._measure(Xt, yt)
        return FitResult(state_dict_to_arrays(module.state_dict()), n, train_loss, train_accuracy)

    def evaluate(self, params: dict[str, np.ndarray], X: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """Mean loss and accuracy of ``params`` on ``(X, y)`` (eval mode, no gradients)."""
        self._load(params, copy=False)  # read only: evaluation changes no tensor
        return self._measure(*self._tensors(X, y))

    def _measure(self, Xt: torch.Tensor, yt: torch.Tensor) -> tuple[float, float]:
        module = self.module
        module.eval()
        n = int(Xt.shape[0])
        if n == 0:
            return 0.0, 0.0
        total, correct = 0.0, 0
        with torch.no_grad():
            for start in range(0, n, EVAL_BATCH):
                out = module(Xt[start:start + EVAL_BATCH])
                target = yt[start:start + EVAL_BATCH]
                total += float(self.loss(out, target)) * int(target.shape[0])
                correct += int((out.argmax(dim=1) == target).sum())
        loss = total / n
        return (loss if math.isfinite(loss) else float("inf")), correct / n

    # ------------------------------------------------------------------ export
    def state_dict(self, params: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """``params`` as the module's own ``state_dict`` (its names and dtypes, on the CPU)."""
        return arrays_to_state_dict(params, self._template, device="cpu", copy=True)

    def export_files(self, params: Mapping[str, np.ndarray]) -> dict[str, bytes]:
        """``model.pt``: the state_dict, loadable with ``torch.load(path, weights_only=True)``."""
        buf = io.BytesIO()
        torch.save(self.state_dict(params), buf)
        return {"model.pt": buf.getvalue()}


def _has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
