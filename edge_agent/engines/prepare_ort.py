"""Preparing a bundle on ONNX Runtime: both models loaded, their memory measured per batch, the
largest batch both fit in the budget."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Dict

from edge_agent.bundle.manifest import ManifestBody
from edge_agent.config import EngineConfig
from edge_agent.engines.base import Engine
from edge_agent.engines.budget import MIB, MemoryBudget
from edge_agent.engines.prepared import MODELS, Emit, PreparedModels, file_sha256
from edge_agent.engines.tuner import MemoryModel, max_batch_for_budget
from edge_agent.errors import ResourceError

log = logging.getLogger(__name__)


def prepare_ort(bundle_dir: Path, manifest: ManifestBody, cfg: EngineConfig, budget: MemoryBudget,
                 emit: Emit) -> PreparedModels:
    """Load both ONNX models, measure their memory per batch and size the max batch to the budget."""
    from edge_agent.engines.ort import OrtEngine, measure_memory_model

    engines: Dict[str, Engine] = {}
    mem_models: Dict[str, MemoryModel] = {}
    methods: Dict[str, str] = {}
    try:
        for name in MODELS:
            spec = manifest.models[name]
            eng = OrtEngine(bundle_dir / spec.path, max_batch=cfg.max_batch_limit,
                            intra_op_threads=cfg.ort_intra_op_threads)
            engines[name] = eng
            fixed, per_item, method = measure_memory_model(eng, probe_batch=min(16, cfg.max_batch_limit))
            mem_models[name] = MemoryModel(fixed, per_item)
            methods[name] = method
        max_b = max_batch_for_budget(list(mem_models.values()), budget.budget_bytes, cfg.max_batch_limit)
        if max_b < 1:
            need = sum(m.bytes_at(1) for m in mem_models.values())
            raise ResourceError("both models need %.1f MB at batch 1 but the memory budget is %.1f MB"
                                % (need / MIB, budget.budget_bytes / MIB))
        for name, eng in engines.items():
            eng.max_batch = max_b
            emit("engine-loaded", "%s model loaded with onnxruntime (max batch %d)" % (name, max_b),
                 {"model": name, "backend": "onnxruntime", "source": "onnx", "max_batch": max_b,
                  "providers": ",".join(getattr(eng, "providers", [])),
                  "memory_mb": round(mem_models[name].bytes_at(max_b) / MIB, 2), "memory_method": methods[name]})
    except BaseException:
        for eng in engines.values():
            eng.close()
        raise
    import onnxruntime

    keys = {}
    for name in MODELS:
        eng = engines[name]
        raw = json.dumps([file_sha256(manifest, manifest.models[name].path), "onnxruntime", onnxruntime.__version__,
                          getattr(eng, "providers", []), cfg.ort_intra_op_threads, max_b], sort_keys=True)
        keys[name] = "ort-" + hashlib.sha256(raw.encode()).hexdigest()[:32]
    models = PreparedModels(
        small=engines["small"], large=engines["large"], backend="onnxruntime", precision="fp32",
        batch={n: 1 for n in MODELS}, budget_bytes=budget.budget_bytes, max_batch=max_b,
        precisions={n: "fp32" for n in MODELS}, sources={n: "onnx" for n in MODELS},
        memory_bytes={n: mem_models[n].bytes_at(max_b) for n in MODELS}, tuning_keys=keys,
        memory_models=mem_models,
    )
    return models
