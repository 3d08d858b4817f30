"""Every file a run leaves for later, and both formats. Pure torch.

- The training state (`state.pt` in a Ray checkpoint folder): weights, optimizer, step, random generators and the
  resolved config, enough to resume exactly.
- The final model (`model/` in a run folder, and the run's `model/` artifacts): `model.pt`, a plain state dict, and
  `model_config.json`, the model's shape, tokenizer, step and validation loss: enough to rebuild without the YAML.
  `python -m fwray.export --format safetensors` writes the same folder with `model.safetensors` instead of model.pt.
Both hold CPU tensors (they load on a machine without the training GPU) and load with `weights_only=True`.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path

import torch

from .. import config
from ..config import BEFORE_THE_SWITCH, Experiment, ModelConfig
from ..errors import FwrayError
from . import tokens
from .model import GPT

STATE_FILE = "state.pt"
MODEL_DIR = "model"
MODEL_FILE = "model.pt"
SAFETENSORS_FILE = "model.safetensors"
MODEL_CONFIG = "model_config.json"
CONFIG_FILE = "config.yaml"  # the resolved experiment, in the run folder (beside model/ and the Ray checkpoints)


class ModelNotFound(FwrayError):
    """No model where the user pointed (a folder, an MLflow run), in one line."""

    exit_code = 2


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
    folder = Path(folder)
    weights = (folder / MODEL_FILE).is_file() or (folder / SAFETENSORS_FILE).is_file()
    return weights and (folder / MODEL_CONFIG).is_file()


def save_model(folder: str | os.PathLike, exp: Experiment, weights: dict, step: int, val_loss: float | None) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _save(weights, folder / MODEL_FILE)
    meta = {**_model_meta(exp), "step": step, "val_loss": val_loss}
    tokens.write_atomic(folder / MODEL_CONFIG, json.dumps(meta, indent=2).encode())


def save_safetensors(folder: str | os.PathLike, weights: dict, meta: dict) -> None:
    """The final model's folder with model.safetensors for its weights (no pickle: any framework reads it)."""
    from safetensors.torch import save  # the export extra: only this format needs it

    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    if model_config(meta).tie_embeddings:  # the head is the embedding's matrix: safetensors stores no tensor twice
        del tensors["lm_head.weight"]
    folder = Path(folder)
    tokens.write_atomic(folder / SAFETENSORS_FILE, save(tensors, metadata={"format": "pt"}))
    tokens.write_atomic(folder / MODEL_CONFIG, json.dumps(meta, indent=2).encode())


def _model_meta(exp: Experiment) -> dict:
    return {**dataclasses.asdict(exp.model), "tokenizer": exp.data.tokenizer, "eot": tokens.EOT}


def model_config(meta: dict) -> ModelConfig:
    """The model's shape from its saved config (which also holds the tokenizer, step and validation loss)."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{**BEFORE_THE_SWITCH, **{k: v for k, v in meta.items() if k in fields}})


def _model(meta: dict, weights: dict) -> GPT:
    model = GPT(model_config(meta))
    model.load_state_dict(weights)
    return model


def load_model(folder: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """The final model of a run (model.pt, or model.safetensors) and its config (shape, tokenizer, step, validation
    loss)."""
    folder = Path(folder)
    meta = json.loads((folder / MODEL_CONFIG).read_text())
    if (folder / MODEL_FILE).is_file():
        weights = torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=True)
    else:
        from safetensors.torch import load_file

        weights = load_file(folder / SAFETENSORS_FILE)
        if model_config(meta).tie_embeddings:
            weights["lm_head.weight"] = weights["transformer.wte.weight"]
    return _model(meta, weights).to(device).eval(), meta


def model_from_state(folder: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """The model held by a training state, and the same config `load_model` gives."""
    state = load_state(folder)
    meta = {**state["model_config"], "step": state["step"]}
    return _model(meta, state["model"]).to(device).eval(), meta


def find_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """A model folder, a Ray checkpoint folder, a run folder (its `model/`), or a Ray run folder (latest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise ModelNotFound(f"{path}: no such checkpoint folder")
    if path.is_file():
        path = path.parent
    if is_model(path):
        return load_model(path, device)
    if is_state(path):
        return model_from_state(path, device)
    if is_model(path / MODEL_DIR):
        return load_model(path / MODEL_DIR, device)
    checkpoints = sorted(p for p in path.glob("checkpoint_*") if is_state(p))
    if checkpoints:
        return model_from_state(checkpoints[-1], device)
    raise ModelNotFound(f"{path}: neither {MODEL_FILE} + {MODEL_CONFIG} nor a Ray checkpoint ({STATE_FILE}) there")


def experiment_near(path: str | os.PathLike) -> Experiment | None:
    """The resolved experiment of the run a model or checkpoint folder belongs to: config.yaml in that folder or the
    one above (a run folder holds model/ and the Ray checkpoints); None for a folder on its own."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    for candidate in (folder / CONFIG_FILE, folder.parent / CONFIG_FILE):
        if candidate.is_file():
            return config.load(candidate)
    return None
