"""Scoring a few-shot segmenter on held-out volumes, clean and under attack (PNODE's protocol).

For the test organ, every organ-containing slice of each test volume is a query, paired with the
aligned slice of each of the first K training volumes that contain the organ
(:func:`~metarobust.data.seg_episodes.evaluation_episodes`); the predicted slices are stacked per volume
and scored by the 3-D Dice, then averaged over test volumes with a 95 % interval
(``1.96 s / sqrt(V)``). Only organ-containing slices are scored, as the papers do: optimistic
against full-volume evaluation. Two reference rows come for free: ``all_background`` (Dice 0) and
``copy_support`` (the aligned support masks, majority over shots, as the prediction).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from metarobust.data.seg_episodes import (
    EvalVolume,
    check_manifest,
    episodes_record,
    evaluation_episodes,
    manifest_path,
)
from metarobust.data.seg_volumes import Volumes
from metarobust.segmentation.attacks import SegAttack
from metarobust.segmentation.dice import mean_ci95, volume_dice, volume_hd95
from metarobust.segmentation.network import FewShotSegmenter


@contextlib.contextmanager
def ode_solver(model: FewShotSegmenter, method: str | None):
    """Run a block with the model's ODE block on solver ``method`` (``None``: unchanged)."""
    if method is None or model.ode is None:
        yield model
        return
    before = model.ode.method
    model.ode.method = method
    try:
        yield model
    finally:
        model.ode.method = before


def episode_tensors(train: Volumes, test: Volumes, tv: EvalVolume, rows: torch.Tensor, organ: int):
    """``(sx [B, K, 1, H, W], sm [B, K, H, W], qx [B, 1, 1, H, W], qm [B, 1, H, W])`` for the
    queries ``rows`` of a test volume."""
    s, q = tv.support[rows], tv.query[rows]
    sx = train.images[s].float().div(255).unsqueeze(2)
    sm = (train.labels[s] == organ).long()
    qx = test.images[q].float().div(255)[:, None, None]
    qm = (test.labels[q] == organ).long()[:, None]
    return sx, sm, qx, qm


def predict_volume(model: FewShotSegmenter, train: Volumes, test: Volumes, tv: EvalVolume, organ: int,
                   batch: int, attack: SegAttack | None = None, generator: torch.Generator | None = None,
                   attack_solver: str | None = None) -> tuple[torch.Tensor, list[int], torch.Tensor | None]:
    """``(pred [n, H, W], NFE per forward, the attacked images [n, H, W] or None)``: the attacked
    query slices, or the first attacked support slice of each query."""
    preds, nfes, shown = [], [], []
    for start in range(0, len(tv.query), batch):
        rows = torch.arange(start, min(start + batch, len(tv.query)), device=tv.query.device)
        sx, sm, qx, qm = episode_tensors(train, test, tv, rows, organ)
        if attack is not None:
            with ode_solver(model, attack_solver):
                sx, qx = attack(model, sx, sm, qx, qm, generator)
            shown.append((qx if attack.target == "query" else sx)[:, 0, 0].detach())
        with torch.no_grad():
            logits = model(sx, sm, qx)
        nfes.append(model.nfe)
        preds.append(logits[:, 0].argmax(dim=1))
    return torch.cat(preds), nfes, (torch.cat(shown) if shown else None)


def summarise(name: str, eps: float | None, target: str, scores: dict[str, float],
              nfes: list[int] | None = None, hd95: dict[str, float | None] | None = None) -> dict[str, Any]:
    """One row of the result: mean Dice and its 95 % interval over volumes; with ``hd95`` (per
    volume, MONAI installed) the mean HD95 over the volumes where it is defined (both masks
    non-empty), its interval, and how many volumes it was undefined on."""
    mean, ci = mean_ci95(list(scores.values()))
    row = {"attack": name, "eps": eps, "target": target, "dice": mean, "dice_ci95": ci, "per_volume": scores}
    if nfes:
        row["nfe_mean"] = sum(nfes) / len(nfes)
    if hd95 and all(v is not None for v in hd95.values()):
        defined = [v for v in hd95.values() if not math.isnan(v)]
        row["hd95"], row["hd95_ci95"] = mean_ci95(defined) if defined else (float("nan"), float("nan"))
        row["hd95_undefined"] = len(hd95) - len(defined)
        row["hd95_per_volume"] = hd95
    return row


def settings(seg) -> list[tuple[str, float | None, str]]:
    """``(attack, eps, target)`` for every configured attack; CW has no eps (run once)."""
    out = []
    for name in seg.attacks:
        for target in seg.attack_targets:
            for eps in ([None] if name == "cw" else seg.eps):
                out.append((name, eps, target))
    return out


def evaluate_segmentation(cfg, model: FewShotSegmenter, train: Volumes, test: Volumes,
                          freeze: bool = False, progress: bool = False) -> dict[str, Any]:
    """Dice on the test volumes, clean, for the two reference predictions and under every
    ``seg.attacks`` x ``seg.eps`` x ``seg.attack_targets``; returns the result dict (the schema of
    ``seg_eval.json``) with ``"_overlays"`` (tensors for :func:`plot_overlays`). ``freeze``: check
    the test episodes against (or write) ``episodes/<dataset>/seg_<organ>_<K>shot.json``."""
    s = cfg.seg
    model.eval()
    organ = train.organ_id(s.organ)
    support_ids, volumes = evaluation_episodes(train, test, s.organ, s.shots)
    if freeze:
        check_manifest(manifest_path(s.dataset, s.organ, s.shots),
                       episodes_record(s.dataset, s.organ, s.shots, train, test, support_ids, volumes))
    truth = {tv.id: (test.labels[tv.query] == organ) for tv in volumes}
    rows: list[dict[str, Any]] = []

    # reference predictions: nothing, and the aligned support masks themselves
    rows.append(summarise("all_background", None, "-", {v: volume_dice(torch.zeros_like(g), g) for v, g in truth.items()}))
    copied = {tv.id: (train.labels[tv.support] == organ).float().mean(dim=1) >= 0.5 for tv in volumes}
    rows.append(summarise("copy_support", None, "-", {v: volume_dice(c, truth[v]) for v, c in copied.items()},
                          hd95={v: volume_hd95(c, truth[v]) for v, c in copied.items()}))

    generator = torch.Generator(device=test.device).manual_seed(cfg.seed + 2)
    overlay_volume = volumes[0]
    overlays: dict[str, Any] = {"query": None, "truth": truth[overlay_volume.id], "pred": {}, "adv": {}}
    todo = [("clean", None, "-")] + settings(s)
    bar = todo
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(todo, desc=f"seg eval {s.organ}", dynamic_ncols=True)
    for name, eps, target in bar:
        attack = None if name == "clean" else SegAttack(name, eps or 0.0, target, s.clip, s.apgd_steps,
                                                        s.square_queries)
        scores, hd95, nfes = {}, {}, []
        for tv in volumes:
            pred, nfe, shown = predict_volume(model, train, test, tv, organ, s.eval_batch, attack, generator,
                                              s.attack_solver)
            scores[tv.id] = volume_dice(pred, truth[tv.id])
            hd95[tv.id] = volume_hd95(pred, truth[tv.id])
            nfes += nfe
            if tv is overlay_volume:
                key = f"{name}" if eps is None else f"{name} eps {eps:g} ({target})"
                overlays["pred"][key] = pred
                if shown is not None:
                    overlays["adv"][key] = shown
        rows.append(summarise(name, eps, target, scores, nfes if model.ode is not None else None, hd95))
    overlays["query"] = test.images[overlay_volume.query].float().div(255)
    return {"organ": s.organ, "shots": s.shots, "dataset": s.dataset, "image_size": test.image_size,
            "support_volumes": support_ids, "test_volumes": [tv.id for tv in volumes],
            "slices": sum(len(tv.query) for tv in volumes), "clip": s.clip, "attack_solver": s.attack_solver,
            "apgd_steps": s.apgd_steps, "square_queries": s.square_queries,
            "results": rows, "_overlays": overlays}


def render_table(result: dict[str, Any], title: str = "") -> str:
    """A Markdown table: one row per setting, Dice mean ± 95 % interval over test volumes (and
    HD95 in voxels where MONAI computed it: mean ± interval over the volumes where it is defined,
    with the count of volumes where the prediction was empty)."""
    with_hd = any("hd95" in r for r in result["results"])
    head = "| setting | eps | attacked | Dice (mean ± 95 % interval) | NFE |" + (" HD95 (voxels) |" if with_hd else "")
    rule = "|---|---:|---|---:|---:|" + ("---:|" if with_hd else "")
    lines = [f"### {title or result['organ']} ({result['shots']}-shot, {len(result['test_volumes'])} test volumes, "
             f"{result['slices']} query slices)", "", head, rule]
    for r in result["results"]:
        eps = "" if r["eps"] is None else f"{r['eps']:g}"
        nfe = f"{r['nfe_mean']:.1f}" if "nfe_mean" in r else ""
        line = f"| {r['attack']} | {eps} | {r['target']} | {r['dice']:.3f} ± {r['dice_ci95']:.3f} | {nfe} |"
        if with_hd:
            hd = ""
            if "hd95" in r:
                hd = f"{r['hd95']:.1f} ± {r['hd95_ci95']:.1f}"
                if r["hd95_undefined"]:
                    hd += f" ({r['hd95_undefined']} empty)"
            line += f" {hd} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def plot_overlays(result: dict[str, Any], path, slices: int = 3):
    """A PNG grid: for ``slices`` query slices of the first test volume (spread over its depth),
    the query, the ground truth, the clean prediction and each attacked prediction (with the
    attacked query image where the query was attacked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from metarobust.plots import save_figure

    ov = result["_overlays"]
    n = ov["query"].shape[0]
    picks = torch.linspace(0, n - 1, min(slices, n)).round().long().tolist()
    preds = list(ov["pred"].items())
    cols = 2 + len(preds)
    fig, axes = plt.subplots(len(picks), cols, figsize=(2.0 * cols, 2.1 * len(picks)), squeeze=False)
    for r, z in enumerate(picks):
        panels = [("query", ov["query"][z], None), ("ground truth", ov["query"][z], ov["truth"][z])]
        for key, pred in preds:
            image = ov["adv"][key][z] if key in ov["adv"] else ov["query"][z]
            panels.append((key, image, pred[z]))
        for c, (label, image, mask) in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(image.cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            if mask is not None:
                ax.contour(mask.cpu().float().numpy(), levels=[0.5], colors="lime" if c == 1 else "red", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(label, fontsize=6)
    fig.suptitle(f"{result['organ']}, {result['shots']}-shot: green truth, red prediction", fontsize=8)
    return save_figure(fig, path)


__all__ = ["evaluate_segmentation", "ode_solver", "plot_overlays", "predict_volume", "render_table"]
