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
            f"trained with crackmap ({state.get('iteration', '?')} iterations).",
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
