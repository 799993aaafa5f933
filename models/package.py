"""Turn a trained checkpoint into a registry version: weights, verified ONNX, model card."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from models import registry
from models.hrsegnet import MEAN, STD, avg_pool_name, create, pool_kwargs
from models.onnx_export import export_onnx, verify_onnx

DATA_LICENSES = {
    "deepcrack": "non-commercial research and educational use only (Liu et al. 2019)",
    "crackforest_cfd": "non-commercial research only (Shi et al. 2016)",
    "paveseg_preview": "Apache-2.0 (FuturePave/PaveSeg-Dataset preview)",
    "uav75": "GPL-3.0 (Benz et al. 2019)",
    "gaps384": "non-commercial research only (GAPs, TU Ilmenau; registration required)",
    "aiglern": "non-commercial research only (Aigle-RN database)",
    "crack500": "non-commercial research only (Yang et al. 2019)",
    "shadowcrack": "non-commercial research only (terms of the original not stated)",
    "uav_crackx": "non-commercial research only, cite the authors (no licence stated)",
    "uav_kaggle": "CC0 1.0",
    "sut_crack": "CC BY 4.0 (SUT-Crack, Mendeley Data, doi 10.17632/gsbmknrhkv.6)",
    "crack_sc": "MIT",
}
MAX_ONNX_DIFF = 0.5 / 255 + 1e-4  # uint8 rounding, plus float error


def license_text(datasets: list[str]) -> str:
    """The license consequence of training on ``datasets``, for the model card."""
    terms = "\n".join(f"- {d}: {DATA_LICENSES.get(d, 'see the dataset README')}" for d in datasets)
    restricted = [d for d in datasets if "non-commercial" in DATA_LICENSES.get(d, "")]
    verdict = (
        f"Because {', '.join(restricted)} may be used for non-commercial research only, "
        "these weights are for NON-COMMERCIAL RESEARCH USE ONLY. Retrain on data you may "
        "use commercially before any commercial use."
        if restricted
        else "No training dataset restricts commercial use; check each license above."
    )
    return f"Trained on:\n{terms}\n\n{verdict} The crackmap code itself is Apache-2.0."


def package(
    checkpoint: Path,
    name: str,
    version: str,
    root: Path = registry.ZOO,
    default: bool = False,
    summary: str = "",
) -> registry.ModelEntry:
    """Add a checkpoint (``models.train`` output) to the registry at ``root``."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    net = create(state["variant"], **pool_kwargs(state.get("avg_pool")))
    net.load_state_dict(state["state_dict"])
    net.eval()
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights.pt"
        torch.save(
            {"state_dict": net.state_dict(), "variant": state["variant"], "avg_pool": avg_pool_name(net)},
            weights,
        )
        onnx_path = export_onnx(net, Path(tmp) / "model.onnx")
        diff = verify_onnx(net, onnx_path)
        if diff > MAX_ONNX_DIFF:
            raise registry.ModelError(f"ONNX export of {checkpoint} differs from torch by {diff:.2e}")
        datasets = list((state.get("data") or {}).get("datasets", []))
        card = {
            "name": name,
            "version": version,
            "variant": state["variant"],
            "avg_pool": avg_pool_name(net),
            "summary": summary
            or f"HrSegNet-{state['variant'].upper()} crack segmentation, "
            f"trained with crackmap ({state.get('iteration', '?')} iterations"
            + (
                f" from the weights of {init['from']}"
                if (init := (state.get("recipe") or {}).get("init"))
                else ""
            )
            + ").",
            "input": {
                "size_px": 400,
                "channels": "RGB",
                "dtype": "uint8",
                "mean": list(MEAN),
                "std": list(STD),
                "scale": "x / 255, then (x - mean) / std",
            },
            "output": "crack probability (softmax of class 1) x 255, rounded, uint8 (N, H, W)",
            "threshold": float(state["threshold"]),
            "metrics": state.get("val_metrics", {}),
            "onnx": {"opset": 18, "max_abs_diff_vs_torch": diff, "dynamic_batch": True},
            "data": state.get("data", {}),
            "recipe": state.get("recipe", {}),
            "train_seconds": state.get("train_seconds"),
            "license": {
                "weights": "non-commercial research only"
                if "NON-COMMERCIAL" in license_text(datasets)
                else "see text",
                "text": license_text(datasets),
            },
        }
        return registry.add(root, card, {"weights": weights, "onnx": onnx_path}, default=default)


# What was measured of a version (its graphs, or its weights by models.evaluate, which also
# records the background): a rebuilt version measures its own.
MEASURED_SECTIONS = (
    "files",
    "created",
    "int8",
    "evaluation",
    "background",
    "vectorize",
    "vector_accuracy",
    "rebuilt_from",
)


def rebuild(
    source: registry.ModelEntry, version: str, root: Path = registry.ZOO, default: bool = False
) -> registry.ModelEntry:
    """A new version with ``source``'s weights and the graph the exporter writes now.

    Versions are immutable, so a faster inference graph for trained weights is a new
    version: the weights file is copied byte for byte, ``model.onnx`` is exported
    again and verified against torch, and the card keeps what belongs to the weights
    (training data, recipe, threshold, the trainer's val metrics).  What was measured of
    the source's graphs (INT8 graph, evaluation, line settings, vector accuracy) is left
    out: measure the new version's own (README, Models).
    """
    from models.onnx_export import load_net

    if registry.version_key(version) <= registry.version_key(source.version):
        raise registry.ModelError(f"a rebuild of {source.spec} needs a higher version than {source.version}")
    weights = source.file("weights")
    net = load_net(source.variant, weights)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(net, Path(tmp) / "model.onnx", source.size_px)
        diff = verify_onnx(net, onnx_path, size_px=source.size_px)
        if diff > MAX_ONNX_DIFF:
            raise registry.ModelError(f"ONNX export of {source.spec} differs from torch by {diff:.2e}")
        card = {key: value for key, value in source.card.items() if key not in MEASURED_SECTIONS}
        card.update(
            version=version,
            summary=f"{source.card.get('summary', '')} The weights of {source.spec}, with the inference "
            "graph of the current exporter.".strip(),
            onnx=dict(source.card.get("onnx", {}), max_abs_diff_vs_torch=diff),
            rebuilt_from={"spec": source.spec, "weights_sha256": source.card["files"]["weights"]["sha256"]},
        )
        return registry.add(root, card, {"weights": weights, "onnx": onnx_path}, default=default)
