"""A data option's default is stated in the recipe's schema (config.py) and in its DataModule's signature; the two
must agree, for every recipe (shipped, copied or new), so that a DataModule built in code behaves as one built
from the config. The recipe's data YAML may set another value on purpose (what its demo data needs)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from aifactory_train.locations import load_object, recipe_folders, recipe_info, use_recipes

use_recipes()


def _plain(value):
    if dataclasses.is_dataclass(value):
        return None  # a nested section: the DataModule takes it as a mapping (default None)
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("name", sorted(recipe_folders()))
def test_the_schema_and_the_datamodule_state_the_same_data_defaults(name):
    from hydra.utils import get_class

    schema = load_object(recipe_info(name).schema)
    data_class = {f.name: f for f in dataclasses.fields(schema)}["data"].default_factory
    section = data_class()
    datamodule = get_class(section._target_)
    parameters = inspect.signature(datamodule.__init__).parameters
    differ = []
    for field in dataclasses.fields(data_class):
        parameter = parameters.get(field.name)
        if field.name.startswith("_") or parameter is None or parameter.default is inspect.Parameter.empty:
            continue
        stated, signature = _plain(getattr(section, field.name)), _plain(parameter.default)
        if stated is None or signature is None:
            continue  # a section the DataModule takes as a mapping, or no default on one side
        if stated != signature:
            differ.append(f"data.{field.name}: schema {stated!r}, {datamodule.__name__} {signature!r}")
    assert not differ, differ
