"""``--seeds N``: one comparison per training seed, then every number as mean ± std over the seeds.

The data split and the shifted sets stay those of ``--seed``; only training
(initialisation, batch order, DST's random choices) changes with the seed, so
the spread says how much of a difference between two rows is luck.
"""

from __future__ import annotations

import statistics
from typing import Dict, List

# seeds far apart: a DST Ensemble seeds its members seed, seed + 1, ...; repeats must not share them
SEED_STRIDE = 1000


def training_seeds(seed: int, count: int) -> List[int]:
    """The training seed of each of ``count`` repeats, the first being ``seed`` itself."""
    if count < 1:
        raise ValueError(f"--seeds must be a positive integer, got {count}")
    return [seed + SEED_STRIDE * i for i in range(count)]


def _stats(values: List[float]):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def aggregate(summaries: List[Dict[str, object]], seeds: List[int]) -> Dict[str, object]:
    """One summary whose rows hold each number's mean over ``summaries`` and its sample std as
    ``<column>_std`` (and ``by_severity`` means); the per-seed summaries are kept under ``per_seed``."""
    if len(summaries) == 1:
        return summaries[0]
    first = summaries[0]
    shapes = [[r["model"].split(" (")[0] for r in s["rows"]] for s in summaries]
    if any(shape != shapes[0] for shape in shapes):
        raise ValueError(f"the seeds' tables have different rows: {shapes}")
    rows = []
    for i, row in enumerate(first["rows"]):
        peers = [s["rows"][i] for s in summaries]
        names = {p["model"] for p in peers}  # "edst ensemble (M=3)" keeps its M; members differ by epoch
        out = {"model": names.pop() if len(names) == 1 else shapes[0][i]}
        for key, value in row.items():
            if _number(value) and all(_number(p.get(key)) for p in peers):
                out[key], out[f"{key}_std"] = _stats([float(p[key]) for p in peers])
        if row.get("by_severity"):
            out["by_severity"] = {sev: {m: statistics.fmean(p["by_severity"][sev][m] for p in peers)
                                        for m in metrics} for sev, metrics in row["by_severity"].items()}
        rows.append(out)
    diversity = {k: statistics.fmean(s["diversity"][k] for s in summaries) for k in ("disagreement", "kl")}
    seconds = {key: {k: (statistics.fmean(s[key][k] for s in summaries)
                         if all(s[key][k] is not None for s in summaries) else None) for k in first[key]}
               for key in ("epoch_seconds", "checkpoint_seconds")}
    # the rest (config, calibration, machine, shift) is the first seed's
    return {**first, "rows": rows, "seeds": seeds, "diversity": diversity, **seconds, "per_seed": summaries}
