"""torchao, as chapter 03 teaches it: what older tutorials wrote, and what works today.

The configs themselves are torchao's own classes, passed to diffusers' `TorchAoConfig` in the chapter's cells.
Probing every config in worker processes (a crash becomes a row) is the lab's: `quantlab.lab.torchao_probe`.
"""

from __future__ import annotations

__all__ = ["MIGRATION"]

# What older tutorials (the seed blog among them) wrote, and what works with diffusers 0.42 + torchao 0.18.
MIGRATION: tuple[tuple[str, str], ...] = (
    ('TorchAoConfig("int8wo") / "int8_weight_only"', "TorchAoConfig(Int8WeightOnlyConfig())"),
    ('TorchAoConfig("int8dq") / "int8_dynamic_activation_int8_weight"',
     "TorchAoConfig(Int8DynamicActivationInt8WeightConfig())"),
    ('TorchAoConfig("int4wo") / "int4_weight_only"', "TorchAoConfig(Int4WeightOnlyConfig(group_size=128))"),
    ('TorchAoConfig("float8wo") / "float8_weight_only"', "TorchAoConfig(Float8WeightOnlyConfig())"),
    ('TorchAoConfig("float8dq_e4m3_row")', "TorchAoConfig(Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))"),
    ('TorchAoConfig("float8dq_e4m3_tensor")',
     "TorchAoConfig(Float8DynamicActivationFloat8WeightConfig(granularity=PerTensor()))"),
    ('TorchAoConfig("autoquant")', "gone: measure the configs (this chapter's table) and choose; mix per layer with "
                                   "FqnToConfig({'layer.name': config, ...})"),
    ('TorchAoConfig("fp6_e3m2") and other fpx, "uint4wo" and other uintx', "gone; for sub-byte integers use "
                                                                            "IntxWeightOnlyConfig(weight_dtype=torch.int4)"),
    ('uint4wo saved with use_safetensors=False (a pickle)', "save_pretrained() writes safetensors; no pickle to load"),
)
