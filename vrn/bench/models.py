"""The model ``vrn-bench`` measures: which one (``--weights``, ``--model``), and its
description in the report (architecture, size, multiply-accumulates, provenance)."""

from __future__ import annotations

import copy


def load_bench_model(settings):
    """The model to measure for :class:`~vrn.bench.plan.BenchSettings` ``settings``, on
    the CPU, and a label for where it came from."""
    from ..model import load_model, random_model

    if settings.weights is not None:
        return load_model(settings.weights), str(settings.weights)
    if settings.model == "full":
        return (random_model(), "--model full: the released architecture with seeded "
                                "random weights (timing does not depend on their values)")
    from ..model.weights import default_weights_path

    shipped = default_weights_path()
    label = (f"package default ({shipped.name})" if shipped is not None else
             "package default (no checkpoint shipped: seeded random initialisation)")
    return load_model(None), label


def count_macs(model) -> int:
    """Multiply-accumulates of one image through ``model``'s convolutions, counted on
    the ``meta`` device (shapes only, no arithmetic)."""
    import torch
    from torch import nn

    from ..export.onnx_export import example_inputs
    from ..model import build_model, model_info

    info = model_info(model)
    try:
        with torch.device("meta"):
            probe = build_model(info.architecture, info.config)
    except Exception:
        probe = copy.deepcopy(model).to("meta")
    probe.eval()
    total = [0]

    def hook(module, inputs, output):
        kernel = module.weight.shape[1] * module.weight.shape[2] * module.weight.shape[3]
        total[0] += output[0].numel() * kernel  # output[0]: one image's outputs

    handles = [m.register_forward_hook(hook) for m in probe.modules()
               if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            probe(*example_inputs(probe, 1, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return total[0]


def describe_model(model, source: str) -> dict:
    """Architecture, configuration, size and provenance of ``model``."""
    from ..model import count_parameters, model_info

    info = model_info(model)
    try:
        gmacs = count_macs(model) / 1e9
    except Exception:
        gmacs = None
    return {"architecture": info.architecture, "config": info.config.to_dict(),
            "parameters": count_parameters(model), "gmacs_per_image": gmacs,
            "trained": bool(info.trained), "bn_mode": info.bn_mode,
            "provenance": info.provenance, "weights": source}


def full_config() -> dict:
    """The released architecture's configuration, as ``VRNConfig.to_dict`` gives it."""
    from ..model import VRNConfig

    return VRNConfig().to_dict()
