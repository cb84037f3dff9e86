"""The checkpoint directory format: one versioned, pickle-free artefact for the API and the proxy.

A checkpoint is a directory::

    router.json          schema version, package versions, encoder config/id/dim, model names in column
                         order, task labels, head types + params, training-data hash, metrics, the
                         policy fit set's prompts and tasks, sha256 of weights
    weights.safetensors  every learned array, keys prefixed by component ("task.", "quality.",
                         "calibrator.", "policy_fit.": the fit set's predicted quality, and "guard."
                         when the router has a novelty guard; older checkpoints have none)
    README.md            a model card written from router.json

Loading needs no training data: the architecture is rebuilt from ``router.json``, never from the
current config. Anything that does not match (schema version, missing file, checksum, array
names or shapes) raises :class:`CheckpointError` naming the problem.
"""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
CONFIG_NAME = "router.json"
WEIGHTS_NAME = "weights.safetensors"
CARD_NAME = "README.md"
# "guard" is optional (a router without a novelty guard)
COMPONENTS = ("task", "quality", "calibrator", "policy_fit", "guard")


class CheckpointError(ValueError):
    """A checkpoint directory is missing, corrupted, or does not match this version of router-ml."""


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("router-ml", "numpy", "torch", "scikit-learn", "sentence-transformers", "safetensors"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_checkpoint(
    path: str | Path, config: dict[str, Any], arrays: dict[str, dict[str, np.ndarray]], card: str
) -> Path:
    """Write ``router.json``, ``weights.safetensors`` and ``README.md`` atomically into ``path``.

    ``arrays`` maps a component name to its state dict. Files are written to temporary names and
    renamed, so a crash never leaves a half-written checkpoint under the final names.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    flat: dict[str, np.ndarray] = {}
    for comp, state in arrays.items():
        if comp not in COMPONENTS:
            raise CheckpointError(f"unknown checkpoint component {comp!r}; expected one of {COMPONENTS}")
        for key, arr in state.items():
            flat[f"{comp}.{key}"] = np.ascontiguousarray(arr)
    tmp_w = path / (WEIGHTS_NAME + ".tmp")
    save_file(flat, str(tmp_w))
    config = dict(config)
    config["schema_version"] = SCHEMA_VERSION
    config["package_versions"] = package_versions()
    config["weights_sha256"] = _sha256(tmp_w)
    config["array_shapes"] = {k: list(v.shape) for k, v in sorted(flat.items())}
    tmp_c = path / (CONFIG_NAME + ".tmp")
    tmp_c.write_text(json.dumps(config, indent=2, sort_keys=False, default=_json_default) + "\n")
    tmp_card = path / (CARD_NAME + ".tmp")
    tmp_card.write_text(card)
    tmp_w.replace(path / WEIGHTS_NAME)
    tmp_card.replace(path / CARD_NAME)
    tmp_c.replace(path / CONFIG_NAME)  # last: a checkpoint is complete once router.json exists
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_config(path: str | Path) -> dict[str, Any]:
    """Read and check ``router.json`` (schema version, required keys)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {str(path)!r} does not exist")
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(f"{str(path)!r} is not a router-ml checkpoint: {CONFIG_NAME} is missing")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{str(cfg_path)!r} is corrupted: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{str(cfg_path)!r} is corrupted: expected a JSON object")
    version = config.get("schema_version")
    if version != SCHEMA_VERSION:
        raise CheckpointError(
            f"{str(cfg_path)!r} has schema_version {version!r}; this router-ml reads version {SCHEMA_VERSION}"
        )
    required = (
        "encoder",
        "models",
        "task_labels",
        "task_head",
        "quality_head",
        "weights_sha256",
        "array_shapes",
    )
    missing = [k for k in required if k not in config]
    if missing:
        raise CheckpointError(f"{str(cfg_path)!r} is corrupted: missing key(s) {missing}")
    if not config["models"] or len(set(config["models"])) != len(config["models"]):
        raise CheckpointError(f"{str(cfg_path)!r}: 'models' must be a non-empty list of distinct names")
    return config


def read_arrays(path: str | Path, config: dict[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    """Load ``weights.safetensors``, verify its checksum and shapes, and split it by component."""
    from safetensors.numpy import load_file

    w_path = Path(path) / WEIGHTS_NAME
    if not w_path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r}: {WEIGHTS_NAME} is missing")
    digest = _sha256(w_path)
    if digest != config["weights_sha256"]:
        raise CheckpointError(
            f"checkpoint {str(path)!r}: {WEIGHTS_NAME} is corrupted (sha256 {digest[:12]}… does not match "
            f"router.json's {str(config['weights_sha256'])[:12]}…)"
        )
    try:
        flat = load_file(str(w_path))
    except Exception as e:  # safetensors raises several types for a bad header
        raise CheckpointError(f"checkpoint {str(path)!r}: cannot read {WEIGHTS_NAME}: {e}") from e
    expected = config["array_shapes"]
    if set(flat) != set(expected):
        raise CheckpointError(
            f"checkpoint {str(path)!r}: arrays {sorted(set(flat) ^ set(expected))} differ from router.json"
        )
    for key, arr in flat.items():
        if list(arr.shape) != list(expected[key]):
            raise CheckpointError(
                f"checkpoint {str(path)!r}: array {key!r} has shape {list(arr.shape)}, router.json says "
                f"{expected[key]}"
            )
    out: dict[str, dict[str, np.ndarray]] = {c: {} for c in COMPONENTS}
    for key, arr in flat.items():
        comp, _, name = key.partition(".")
        if comp not in out:
            raise CheckpointError(f"checkpoint {str(path)!r}: unknown array prefix in {key!r}")
        out[comp][name] = arr
    return out
