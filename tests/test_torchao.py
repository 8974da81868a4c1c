"""quantlab.torchao: the migration table chapter 03 shows."""

from __future__ import annotations

import re

import pytest

from quantlab import torchao as qt


def test_migration_table_names_real_classes_and_the_old_strings_fail():
    import torchao.quantization
    from diffusers import TorchAoConfig

    for _, today in qt.MIGRATION:
        for name in re.findall(r"\b([A-Z]\w+Config)\(", today):
            if name != "TorchAoConfig":
                assert hasattr(torchao.quantization, name), name
    with pytest.raises(TypeError, match="AOBaseConfig"):
        TorchAoConfig("int8wo")
