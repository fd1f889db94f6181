"""The recipes' benchmark adapters (``<recipe>/bench.py``), found like every recipe: through
aifactory_train.locations, so a copied recipe or one of ``$AIFT_RECIPES_PATH`` is benchmarked as a shipped one."""

from __future__ import annotations

import importlib
from types import ModuleType

from aifactory_train.errors import ConfigError
from aifactory_train.locations import recipe_folders, recipe_package, use_recipes
from aifactory_train.recipe import BenchAdapter, missing_members

ADAPTER_FILE = "bench.py"


def bench_adapters() -> dict[str, ModuleType]:
    """Recipe name -> its bench adapter module, for every recipe that has one, checked against ``BenchAdapter``."""
    use_recipes()
    adapters = {}
    for name, folder in recipe_folders().items():
        if not (folder / ADAPTER_FILE).is_file():
            continue
        module = importlib.import_module(f"{recipe_package(name)}.bench")
        missing = missing_members(module, BenchAdapter)
        if missing:
            raise ConfigError(f"{folder / ADAPTER_FILE}: lacks {', '.join(missing)}, which BenchAdapter requires "
                              f"(see aifactory_train/recipe.py)")
        adapters[name] = module
    return adapters


def bench_adapter(name: str) -> ModuleType:
    """One recipe's adapter; an unknown name or a recipe without one is refused with the valid names."""
    adapters = bench_adapters()
    if name not in adapters:
        raise ConfigError(f"recipe '{name}' has no benchmark adapter ({ADAPTER_FILE}); recipes with one: "
                          f"{', '.join(sorted(adapters)) or 'none'}")
    return adapters[name]


def recipe_metrics() -> dict[str, tuple[str, bool]]:
    """``<recipe>_<metric>`` -> (what it is, whether it needs a GPU), from each adapter's ``METRICS``."""
    return {f"{name}_{metric}": about for name, module in bench_adapters().items()
            for metric, about in module.METRICS.items()}
