"""The MoA plan file: per layer, per KV head, the elastic span rule S(N) = α + β·N of MoA (Fu et al., arXiv
2406.14909) that `sparse_attention` with `pattern: moa` reads (layers/sparse_attention.py) and `effarch moa-search`
writes (train/moa_search.py).

A JSON object:

    {"format": "effarch-moa-plan", "version": 1,
     "layers": [{"alpha": [α per KV head], "beta": [β per KV head]}, null, ...],   # one entry per model layer
     "density": 0.25, "lengths": [512], "block": 64, "n_sink": 4, ...}            # metadata (optional)

`layers[l]` is null for a layer that is not sparse attention (a hybrid's other mixers). Only "layers" is read by
the model; the rest records how the plan was found (`effarch moa-search` writes the target density, the profiled
lengths, the pooling block, the sink count, the source run and checkpoint step, the calibration size, and the plan's
density and influence loss at each length). A plan that does not match the model fails in one line naming the file
and the key.
"""

import json
import math
from pathlib import Path

FORMAT = "effarch-moa-plan"
VERSION = 1


class PlanError(ValueError):
    """A plan file that cannot be read or does not fit the model; the message names the file and the key."""


def read_plan(path: str | Path) -> dict:
    """The parsed plan file, its "layers" checked (a list of null or {"alpha": [...], "beta": [...]} with numbers
    and as many β as α). Raises PlanError naming the file and the key."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise PlanError(f"{path}: no such file") from None
    except OSError as e:
        raise PlanError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        plan = json.loads(text)
    except json.JSONDecodeError as e:
        raise PlanError(f"{path}: not valid JSON (line {e.lineno} column {e.colno}: {e.msg})") from None
    if not isinstance(plan, dict):
        raise PlanError(f"{path}: expected a JSON object with a 'layers' key, got {type(plan).__name__}")
    if plan.get("format", FORMAT) != FORMAT:
        raise PlanError(f"{path}: format: expected {FORMAT!r}, got {plan['format']!r}")
    if "layers" not in plan:
        raise PlanError(f"{path}: missing key 'layers' (one {{alpha, beta}} entry per model layer)")
    layers = plan["layers"]
    if not isinstance(layers, list) or not layers:
        raise PlanError(f"{path}: layers: expected a non-empty list (one entry per model layer)")
    for i, entry in enumerate(layers):
        if entry is None:
            continue
        if not isinstance(entry, dict):
            raise PlanError(f"{path}: layers[{i}]: expected null or an object with 'alpha' and 'beta'")
        for key in ("alpha", "beta"):
            if key not in entry:
                raise PlanError(f"{path}: layers[{i}]: missing key {key!r}")
            values = entry[key]
            if not isinstance(values, list) or not values or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
                raise PlanError(f"{path}: layers[{i}].{key}: expected a non-empty list of finite numbers")
        if len(entry["alpha"]) != len(entry["beta"]):
            raise PlanError(f"{path}: layers[{i}]: alpha has {len(entry['alpha'])} heads but beta has "
                            f"{len(entry['beta'])}")
        if any(b < 0 for b in entry["beta"]):
            raise PlanError(f"{path}: layers[{i}].beta: expected numbers >= 0 (a span that shrinks with N)")
    return plan


def layer_rule(plan: dict, path: str | Path, *, layer_idx: int, n_layers: int | None,
               n_kv_heads: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(α, β) per KV head of layer `layer_idx` of a model with `n_layers` layers (None: not checked) and
    `n_kv_heads` KV heads. Raises PlanError naming the file and the key that does not match the model."""
    layers = plan["layers"]
    if n_layers is not None and len(layers) != n_layers:
        raise PlanError(f"{path}: layers has {len(layers)} entries but the model has {n_layers} layers")
    if not 0 <= layer_idx < len(layers):
        raise PlanError(f"{path}: layers has {len(layers)} entries, none for layer {layer_idx}")
    entry = layers[layer_idx]
    if entry is None:
        raise PlanError(f"{path}: layers[{layer_idx}] is null, but layer {layer_idx} is a sparse_attention layer")
    if len(entry["alpha"]) != n_kv_heads:
        raise PlanError(f"{path}: layers[{layer_idx}].alpha has {len(entry['alpha'])} heads but the layer has "
                        f"{n_kv_heads} KV heads")
    return tuple(float(a) for a in entry["alpha"]), tuple(float(b) for b in entry["beta"])


def write_plan(path: str | Path, layers: list, **metadata) -> Path:
    """Writes a plan: `layers` (per model layer None or {"alpha": [...], "beta": [...]}) and JSON-able metadata."""
    path = Path(path)
    plan = {"format": FORMAT, "version": VERSION, **metadata, "layers": layers}
    path.write_text(json.dumps(plan, indent=1) + "\n")
    read_plan(path)  # what was written reads back
    return path
