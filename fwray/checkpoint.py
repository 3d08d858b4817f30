"""Every file a run leaves for later, and both formats. Pure torch.

- The training state (`state.pt` in a Ray checkpoint folder): weights, optimizer, step, random generators and the
  resolved config, enough to resume exactly.
- The final model (`model/` in a run folder, and the run's `model/` artifacts): `model.pt`, a plain state dict, and
  `model_config.json`, the model's shape, tokenizer, step and validation loss: enough to rebuild without the YAML.
Both hold CPU tensors (they load on a machine without the training GPU) and load with `weights_only=True`.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path

import torch

from . import config, tokens
from .config import Experiment, ModelConfig
from .model import GPT

STATE_FILE = "state.pt"
MODEL_DIR = "model"
MODEL_FILE = "model.pt"
MODEL_CONFIG = "model_config.json"


def to_cpu(tree):
    """A state (nested dicts and lists of tensors) with every tensor copied to the CPU."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_cpu(v) for v in tree)
    return tree


def _save(obj, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(to_cpu(obj), buf)
    tokens.write_atomic(path, buf.getvalue())


def save_state(folder: str | os.PathLike, state: dict, exp: Experiment) -> None:
    """The engine's state, the resolved experiment it belongs to (for the record) and the model's config (what
    rebuilds the model: the same record the final model carries)."""
    _save({**state, "config": config.to_yaml(exp), "model_config": _model_meta(exp)}, Path(folder) / STATE_FILE)


def load_state(folder: str | os.PathLike) -> dict:
    return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)


def is_state(folder: str | os.PathLike) -> bool:
    return (Path(folder) / STATE_FILE).is_file()


def is_model(folder: str | os.PathLike) -> bool:
    return (Path(folder) / MODEL_FILE).is_file() and (Path(folder) / MODEL_CONFIG).is_file()


def save_model(folder: str | os.PathLike, exp: Experiment, weights: dict, step: int, val_loss: float | None) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _save(weights, folder / MODEL_FILE)
    meta = {**_model_meta(exp), "step": step, "val_loss": val_loss}
    tokens.write_atomic(folder / MODEL_CONFIG, json.dumps(meta, indent=2).encode())


def _model_meta(exp: Experiment) -> dict:
    return {**dataclasses.asdict(exp.model), "tokenizer": exp.data.tokenizer, "eot": tokens.EOT}


def _model(meta: dict, weights: dict) -> GPT:
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    model = GPT(ModelConfig(**{k: v for k, v in meta.items() if k in fields}))
    model.load_state_dict(weights)
    return model


def load_model(folder: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """The final model of a run and its config (shape, tokenizer, step, validation loss)."""
    folder = Path(folder)
    meta = json.loads((folder / MODEL_CONFIG).read_text())
    model = _model(meta, torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=True))
    return model.to(device).eval(), meta


def model_from_state(folder: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """The model held by a training state, and the same config `load_model` gives."""
    state = load_state(folder)
    meta = {**state["model_config"], "step": state["step"]}
    return _model(meta, state["model"]).to(device).eval(), meta
