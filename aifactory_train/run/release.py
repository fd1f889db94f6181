"""What `aift export` checks before a model leaves: parity of the exported files with the checkpoint, and, for
sensitive data, a disclosure check (membership inference, verbatim memorisation, rare strings in a vocabulary).

The recipe supplies the numbers through the contract (aifactory_train/recipe.py: ``ChecksExport``,
``ScoresRecords``, ``ShowsMemorisation``); the comparisons, thresholds and reports are here, the same for every
recipe.

Thresholds (``export.parity_tolerance`` and ``export.disclosure.*``, records/config.py) and why:

- Membership inference (Yeom et al. 2018, "Privacy Risk in Machine Learning: Analyzing the Connection to
  Overfitting", CSF): the loss-threshold attack says "member" when a record's loss is low; its AUC over training
  vs held-out (val + test) records is 0.5 for a model that does not tell them apart, 1.0 for one that has
  memorised its training records. ``max_membership_auc`` 0.75. Measured on the demo notes (64 of 120 training, 36
  held-out records): a 2-epoch LoRA run 0.64, the default run (6 epochs, full fine-tune) 0.66, 12 epochs 0.75, a
  model trained 40 epochs on 8 notes 1.0. With tens of held-out records the AUC's 95 % interval is about
  +-0.1 (Hanley & McNeil 1982), so a bar near 0.6 would refuse ordinary runs by chance; with thousands of held-out
  records, set it lower (0.6). Carlini et al. 2022 ("Membership Inference Attacks From First Principles", IEEE
  S&P) show that an average-case AUC understates the risk to single records: the report also gives the attack's
  true-positive rate at 10 % false positives (``tpr_at_10pct_fpr``).
- Verbatim memorisation (Carlini et al. 2019, "The Secret Sharer", USENIX Security; 2021, "Extracting Training
  Data from Large Language Models", USENIX Security): prompted with a training record's prompt, how much of its
  training text the model returns verbatim (greedy), minus the same on held-out records. The difference, not the
  raw fraction, because templated text (discharge letters) is predictable without being memorised.
  ``max_verbatim_gap`` 0.2 of the target tokens.
- Vocabulary: a tokenizer trained on the notes keeps any string frequent enough within them, also one that
  de-identification missed and that occurs in one record only (a name, a rare code). Every vocabulary entry of
  ``min_vocab_chars`` or more letters/digits must occur in at least ``min_vocab_records`` training records
  (k-anonymity's idea, Sweeney 2002, for strings: a string seen in one record identifies that record).
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable

import numpy as np


def parity(reference: dict[str, Any], exported: dict[str, Any], tolerance: float) -> dict[str, Any]:
    """Compare the PyTorch module's outputs with the exported model's, output by output: the largest absolute
    difference, and whether it is within ``tolerance``. An output missing on one side, or of another shape, is a
    failure (difference infinite)."""
    outputs: dict[str, Any] = {}
    worst = 0.0
    for name in sorted(set(reference) | set(exported)):
        if name not in reference or name not in exported:
            diff, why = math.inf, f"only in the {'PyTorch module' if name in reference else 'exported model'}"
        else:
            a = np.asarray(reference[name], dtype=np.float64)
            b = np.asarray(exported[name], dtype=np.float64)
            if a.shape != b.shape:
                diff, why = math.inf, f"shape {list(a.shape)} (PyTorch) vs {list(b.shape)} (exported)"
            else:
                diff, why = float(np.max(np.abs(a - b))) if a.size else 0.0, None
        outputs[name] = {"max_abs_diff": diff, **({"why": why} if why else {})}
        worst = max(worst, diff)
    return {"max_abs_diff": worst, "tolerance": tolerance, "passed": bool(worst <= tolerance and outputs),
            "outputs": outputs}


def membership_auc(train_losses: Iterable[float], held_out_losses: Iterable[float]) -> float:
    """AUC of the loss-threshold attack (Yeom et al. 2018): a lower loss says "member". 0.5: no signal; 1.0: every
    training record has a lower loss than every held-out one. torchmetrics' AUROC (ties count half)."""
    import torch
    from torchmetrics.functional.classification import binary_auroc

    train, held_out = list(train_losses), list(held_out_losses)
    scores = torch.tensor([-x for x in train + held_out], dtype=torch.float64)
    members = torch.tensor([1] * len(train) + [0] * len(held_out))
    return float(binary_auroc(scores, members))


def tpr_at_fpr(train_losses: list[float], held_out_losses: list[float], fpr: float) -> float:
    """The share of training records the loss-threshold attack finds when its threshold lets through at most
    ``fpr`` of the held-out records (the loss below which that share of held-out records lie)."""
    threshold = float(np.quantile(np.asarray(held_out_losses), fpr))
    return float(np.mean(np.asarray(train_losses) < threshold))


WORD = re.compile(r"\w+")


def rare_vocabulary(vocabulary: Iterable[str], texts: Iterable[str], min_records: int,
                    min_chars: int) -> list[dict[str, Any]]:
    """The vocabulary entries (their letters and digits, ``min_chars`` or more) that occur in fewer than
    ``min_records`` of ``texts``: strings that can point at one record. Matched as substrings, case-sensitive (as
    the tokenizer saw them)."""
    texts = list(texts)
    candidates = {}
    for entry in vocabulary:
        core = max(WORD.findall(entry), key=len, default="")  # its longest run of letters/digits
        if len(core) >= min_chars and core not in candidates:
            candidates[core] = entry
    rare = []
    for core, entry in sorted(candidates.items()):
        count = 0
        for text in texts:
            if core in text:
                count += 1
                if count >= min_records:
                    break
        if count < min_records:
            rare.append({"entry": entry, "records": count})
    return rare


def disclosure_report(module: Any, datamodule: Any, options: dict[str, Any], held_out: list[str]) -> dict[str, Any]:
    """Run every disclosure test the recipe's module supports against ``options`` (``export.disclosure``).
    ``held_out``: the splits the training records are compared with (together). Returns the report; ``passed`` is
    false when a test fails or when no test could run."""
    limit = int(options["records"])

    def scored(method, splits: list[str]) -> list[float]:
        values: list[float] = []
        for split in splits:  # the held-out records shared among its splits
            values += method(datamodule, split, math.ceil(limit / len(splits)))
        return values

    report: dict[str, Any] = {"held_out_splits": held_out, "tests": {}}
    tests = report["tests"]
    # the contract's optional members (ScoresRecords, ShowsMemorisation in aifactory_train/recipe.py, a layer above)
    if hasattr(module, "per_record_losses"):
        train, other = scored(module.per_record_losses, ["train"]), scored(module.per_record_losses, held_out)
        auc = membership_auc(train, other)
        tests["membership_inference"] = {
            "attack": "loss threshold (Yeom et al. 2018)", "auc": round(auc, 4),
            "max_auc": options["max_membership_auc"], "passed": auc <= options["max_membership_auc"],
            # Carlini et al. 2022: what the attack finds at a low false-positive rate matters more than the AUC
            "tpr_at_10pct_fpr": round(tpr_at_fpr(train, other, 0.1), 4),
            "train_records": len(train), "held_out_records": len(other),
            "mean_loss_train": round(float(np.mean(train)), 4), "mean_loss_held_out": round(float(np.mean(other)), 4)}
    if all(hasattr(module, m) for m in ("verbatim_fractions", "vocabulary", "record_texts")):
        train, other = scored(module.verbatim_fractions, ["train"]), scored(module.verbatim_fractions, held_out)
        gap = float(np.mean(train) - np.mean(other))
        tests["verbatim_memorisation"] = {
            "method": "greedy continuation of training prompts, longest verbatim prefix of the training target "
                      "(Carlini et al. 2019, 2021)", "verbatim_fraction_train": round(float(np.mean(train)), 4),
            "verbatim_fraction_held_out": round(float(np.mean(other)), 4), "gap": round(gap, 4),
            "max_gap": options["max_verbatim_gap"], "passed": gap <= options["max_verbatim_gap"],
            "train_records": len(train), "held_out_records": len(other)}
        rare = rare_vocabulary(module.vocabulary(), module.record_texts(datamodule, "train"),
                               options["min_vocab_records"], options["min_vocab_chars"])
        tests["vocabulary"] = {
            "rule": f"every entry of >= {options['min_vocab_chars']} letters/digits occurs in >= "
                    f"{options['min_vocab_records']} training records",
            "rare_entries": len(rare), "passed": not rare,
            # the count and the entries' lengths, not the strings: they may be what must not leave
            "rare_entry_lengths": sorted(len(r["entry"]) for r in rare)[:20]}
    report["passed"] = bool(tests) and all(t["passed"] for t in tests.values())
    if not tests:
        report["why"] = "the recipe's module provides no disclosure test (ScoresRecords in aifactory_train/recipe.py)"
    return report


def failed_tests(report: dict[str, Any]) -> str:
    """The failed tests in a few words each, for the one-line refusal."""
    parts = []
    for name, test in report.get("tests", {}).items():
        if test["passed"]:
            continue
        if name == "membership_inference":
            parts.append(f"membership-inference AUC {test['auc']} > export.disclosure.max_membership_auc "
                         f"{test['max_auc']}")
        elif name == "verbatim_memorisation":
            parts.append(f"verbatim gap {test['gap']} > export.disclosure.max_verbatim_gap {test['max_gap']}")
        elif name == "vocabulary":
            parts.append(f"{test['rare_entries']} tokenizer entries occur in fewer than "
                         f"export.disclosure.min_vocab_records training records")
    return "; ".join(parts) or report.get("why", "no test passed")
