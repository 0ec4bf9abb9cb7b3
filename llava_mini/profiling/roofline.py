"""Roofline per stage: the time floor at the device's measured ceilings, measured time over it, and a
projection to named GPUs from datasheet ceilings (clearly a projection, not a measurement).

floor(stage) = max(FLOPs / matmul rate, bytes / copy bandwidth)

FLOPs and bytes come from :func:`llava_mini.profiling.flops.count_flops` (bytes = weights read once
+ stage inputs/outputs + KV written or read, at the run's dtype). The copy bandwidth is
``Ceilings.copy_gbps`` (bytes read + written per second), so total traffic divides by it directly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from llava_mini.profiling.flops import STAGES, Cost

# Dense bf16 TFLOP/s and HBM TB/s from vendor datasheets (no sparsity).
DATASHEETS: dict[str, dict[str, float]] = {
    "RTX 4090": {"tflops": 165.0, "tbps": 1.01},
    "RTX 3090": {"tflops": 71.0, "tbps": 0.94},
    "A100-80GB": {"tflops": 312.0, "tbps": 2.04},
    "H100 SXM": {"tflops": 989.0, "tbps": 3.35},
    "H200": {"tflops": 989.0, "tbps": 4.8},
}
PROJECTION_LABEL = "projection from datasheet ceilings (not measured)"


def _ceilings(ceilings) -> tuple[float, float, str]:
    """(matmul TFLOP/s, copy GB/s, device) from a ``Ceilings``, its dict, or a datasheet name."""
    if isinstance(ceilings, str):
        if ceilings not in DATASHEETS:
            raise ValueError(f"ceilings: unknown GPU {ceilings!r}; expected one of {', '.join(DATASHEETS)}")
        d = DATASHEETS[ceilings]
        return d["tflops"], d["tbps"] * 1e3, ceilings
    d = ceilings.to_dict() if hasattr(ceilings, "to_dict") else dict(ceilings)
    try:
        tflops, gbps = float(d["matmul_tflops"]), float(d["copy_gbps"])
    except (KeyError, TypeError, ValueError):
        raise ValueError("ceilings: expected a Ceilings, a dict with matmul_tflops and copy_gbps, or a GPU name")
    if tflops <= 0 or gbps <= 0:
        raise ValueError(f"ceilings: rates must be positive, got matmul_tflops={tflops}, copy_gbps={gbps}")
    return tflops, gbps, str(d.get("device", "unknown"))


def floor_ms(flops: float, nbytes: float, matmul_tflops: float, copy_gbps: float) -> float:
    """The time floor in ms: max(FLOPs / matmul rate, bytes / copy bandwidth)."""
    if flops < 0 or nbytes < 0:
        raise ValueError(f"flops/nbytes: expected >= 0, got {flops}, {nbytes}")
    return max(flops / (matmul_tflops * 1e12), nbytes / (copy_gbps * 1e9)) * 1e3


@dataclass
class StageRoofline:
    """One stage on the roofline. ``over_floor`` = measured / floor (1.0 = at the ceiling)."""

    stage: str
    flops: int
    bytes: int
    intensity: float | None  # FLOP per byte
    compute_ms: float
    memory_ms: float
    floor_ms: float
    bound: str  # "compute" | "memory" | "idle"
    measured_ms: float | None = None
    over_floor: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def roofline(cost: Cost | dict, ceilings, measured_ms: dict[str, float] | None = None) -> list[StageRoofline]:
    """Per-stage floor at ``ceilings`` (measured ``Ceilings``/dict, or a datasheet GPU name), and
    measured/floor where ``measured_ms[stage]`` is given. Stages with no work are left out.
    ``measured_ms`` may also hold ``"total"``, reported as a ``total`` row."""
    tflops, gbps, _ = _ceilings(ceilings)
    flops = cost.flops if isinstance(cost, Cost) else cost["flops"]
    byts = cost.bytes if isinstance(cost, Cost) else cost["bytes"]
    measured_ms = measured_ms or {}
    unknown = set(measured_ms) - set(STAGES) - {"total"}
    if unknown:
        raise ValueError(f"measured_ms: unknown stages {sorted(unknown)}; expected {STAGES + ('total',)}")
    rows = []
    for stage in list(STAGES) + ["total"]:
        f = sum(flops.values()) if stage == "total" else flops.get(stage, 0)
        b = sum(byts.values()) if stage == "total" else byts.get(stage, 0)
        if stage == "total" and "total" not in measured_ms:
            continue
        if f == 0 and b == 0:
            continue
        c_ms = f / (tflops * 1e12) * 1e3
        m_ms = b / (gbps * 1e9) * 1e3
        fl = max(c_ms, m_ms)
        meas = measured_ms.get(stage)
        rows.append(StageRoofline(stage=stage, flops=int(f), bytes=int(b), intensity=f / b if b else None,
                                  compute_ms=c_ms, memory_ms=m_ms, floor_ms=fl,
                                  bound="compute" if c_ms >= m_ms else "memory", measured_ms=meas,
                                  over_floor=(meas / fl) if (meas is not None and fl > 0) else None))
    return rows


def project(cost: Cost | dict, gpus: list[str] | None = None) -> dict:
    """Floors per stage on named GPUs from datasheet ceilings: a projection, labelled as such.

    Returns ``{"label": PROJECTION_LABEL, "gpus": {name: {"ceilings": {...}, "stages": {stage: floor_ms},
    "total_ms": float}}}``.
    """
    gpus = list(DATASHEETS) if gpus is None else list(gpus)
    out = {"label": PROJECTION_LABEL, "gpus": {}}
    for g in gpus:
        rows = roofline(cost, g)
        out["gpus"][g] = {"ceilings": dict(DATASHEETS[g]), "stages": {r.stage: r.floor_ms for r in rows},
                          "total_ms": sum(r.floor_ms for r in rows)}
    return out


def ridge_point(ceilings) -> float:
    """FLOP per byte where the compute and memory roofs meet."""
    tflops, gbps, _ = _ceilings(ceilings)
    return tflops * 1e12 / (gbps * 1e9)
