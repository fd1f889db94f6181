"""aift export's checks before release (aifactory_train/run/release.py, commands/export.py), without training:
the comparisons, the attack's AUC and the one-line refusals. The end-to-end cases (an overfit model refused, a
normal one released) are in tests/test_clinical_notes.py."""

from __future__ import annotations

import pytest

from conftest import assert_one_line_naming


def test_parity_fails_on_another_output_or_shape_and_names_it():
    import math

    from aifactory_train.run.release import membership_auc, parity

    ok = parity({"logits": [[1.0, 2.0]]}, {"logits": [[1.0, 2.0005]]}, 1e-3)
    assert ok["passed"] and ok["max_abs_diff"] == pytest.approx(5e-4)
    off = parity({"logits": [[1.0, 2.0]]}, {"logits": [[1.0, 2.1]]}, 1e-3)
    assert not off["passed"] and off["outputs"]["logits"]["max_abs_diff"] == pytest.approx(0.1)
    shape = parity({"logits": [[1.0, 2.0]], "probabilities": [1.0]}, {"logits": [[1.0]]}, 1e-3)
    assert not shape["passed"] and math.isinf(shape["max_abs_diff"])
    assert shape["outputs"]["probabilities"]["why"] == "only in the PyTorch module"
    assert membership_auc([0.1, 0.2], [0.3, 0.4]) == 1.0 and membership_auc([0.3, 0.4], [0.1, 0.2]) == 0.0



def test_spread_indices_cover_the_split_evenly():
    from aifactory_train.recipe import spread_indices

    assert spread_indices(5, 10) == [0, 1, 2, 3, 4]
    assert spread_indices(100, 5) == [0, 25, 50, 74, 99]


def test_tpr_at_low_fpr_and_rare_vocabulary():
    from aifactory_train.run.release import rare_vocabulary, tpr_at_fpr

    assert tpr_at_fpr([0.0, 0.0, 5.0], [1.0 + i for i in range(10)], 0.1) == pytest.approx(2 / 3)
    texts = ["de patient slaapt", "patient slaapt goed", "alleen hier: Zwibbeltje"]
    rare = rare_vocabulary([" patient", " slaapt", " Zwibbeltje", "de", "<pad>"], texts, 2, 4)
    assert rare == [{"entry": " Zwibbeltje", "records": 1}]


def test_an_export_with_no_data_here_is_refused_naming_both_places(tmp_path):
    import torch
    from omegaconf import OmegaConf

    from aifactory_train.commands.export import checked_data_root
    from aifactory_train.errors import DataError
    from aifactory_train.run.provenance import STATE_KEY

    ckpt = tmp_path / "moved.ckpt"
    torch.save({"callbacks": {STATE_KEY: {"datasets": [{"root": "/gone/notes"}]}}}, ckpt)
    cfg = OmegaConf.create({"data": {"root": "data/clinical_notes"}})
    with pytest.raises(DataError) as err:
        checked_data_root(cfg, str(ckpt))
    assert_one_line_naming(str(err.value), ["data.root 'data/clinical_notes'", "/gone/notes", "data.root=DIR"])
    (tmp_path / "here").mkdir()
    torch.save({"callbacks": {STATE_KEY: {"datasets": [{"root": str(tmp_path / "here")}]}}}, ckpt)
    assert checked_data_root(cfg, str(ckpt)) == str(tmp_path / "here") == cfg.data.root


def test_the_refusal_is_one_line_naming_the_failed_check_and_its_figure(tmp_path):
    from aifactory_train.commands.export import refusal
    from aifactory_train.run.release import parity

    bad = {**parity({"logits": [[1.0, 2.0]]}, {"logits": [[1.0, 2.5]]}, 1e-3), "inputs": {"split": "test", "records": 4}}
    assert_one_line_naming(refusal({"parity": bad}, tmp_path),
                           ["max abs diff 0.5", "export.parity_tolerance 0.001", "(logits)", "4 test records",
                            "not released"])
    good = {**bad, "passed": True}
    disclosure = {"why_checked": ["x/datacard.yaml: sensitivity: high"], "train_split_is_the_checkpoints": True,
                  "tests": {"membership_inference": {"passed": False, "auc": 0.97, "max_auc": 0.75},
                            "vocabulary": {"passed": False, "rare_entries": 3}}}
    assert_one_line_naming(refusal({"parity": good, "disclosure": disclosure}, tmp_path),
                           ["sensitivity: high", "AUC 0.97 > export.disclosure.max_membership_auc 0.75",
                            "3 tokenizer entries", "nothing registered"])
