"""`aift data card check PATH` (a data card, validated and said in plain words) and `aift audit verify [PATH]` (the
audit log's hash chain)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parsers(data_sub, sub) -> None:
    """The `data card` and `audit` subcommands, added to cli.py's parsers."""
    card = data_sub.add_parser("card", prog="aift data card", help="data card tools",
                               description="Data card tools.")
    card_sub = card.add_subparsers(dest="card_command", metavar="ACTION", required=True)
    check = card_sub.add_parser(
        "check", prog="aift data card check", help="validate a data card and say what it permits",
        description="Validate the data card at PATH (a datacard.yaml, or a folder: every card at or above it, nearest "
                    "first) as every command reads it: its usage terms, its DUO codes (duo: [...]) and the terms a "
                    "derived dataset carries from its source. Prints what each permits in plain words and what a "
                    "run must declare (run.purpose.*).",
        epilog="exit status: 0 valid; 2 a card that every command would refuse (it says which card, key and value).")
    check.add_argument("path", help="a datacard.yaml or a data folder")
    audit = sub.add_parser("audit", prog="aift audit", help="the audit log", description="The audit log.")
    audit_sub = audit.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    verify = audit_sub.add_parser(
        "verify", prog="aift audit verify", help="check the audit log's hash chain",
        description="Check that no line of the audit log was changed, inserted or removed: every line holds the "
                    "SHA-256 of the one before and its number; the head file beside the log names the last line.",
        epilog="exit status: 0 intact; 1 broken (the first bad line is named); 2 no log at PATH.")
    verify.add_argument("path", nargs="?", default=".",
                        help="the log, or a folder holding aift-audit.jsonl (default: the current folder)")


def card_check(args: argparse.Namespace) -> int:
    from aifactory_train.records.consent import card_codes, plain_words
    from aifactory_train.errors import DataError
    from aifactory_train.records.usage_terms import DATACARD_FILE, card_terms, datacards_for, load_datacard

    path = Path(args.path).expanduser()
    if not path.exists():
        raise DataError(f"data card path '{path}' does not exist; give a {DATACARD_FILE} or a data folder")
    cards = [path] if path.is_file() else datacards_for(path)
    if not cards:
        raise DataError(f"no {DATACARD_FILE} at or above '{path.resolve()}': nothing states what the data may be "
                        f"used for")
    for n, card_path in enumerate(cards):
        card = load_datacard(card_path)
        terms = card_terms(card_path, card)  # every command refuses a card whose terms cannot be read
        codes = card_codes(card, card_path)
        sources = _source_codes(card, card_path)
        if n:
            print()
        print(f"data card {card_path.resolve()}" + (" (covers the data below it)" if n else ""))
        for key in ("name", "owner", "license", "sensitivity"):
            if card.get(key) not in (None, ""):
                print(f"  {key}: {card[key]}")
        if codes is not None:
            print("  permitted use (DUO codes, checked against run.purpose before anything is read):")
            for line in plain_words(codes):
                print(f"    {line}")
        if card.get("consent") not in (None, ""):
            note = "" if codes is not None else " (free text: aift cannot check a run against it; state DUO codes)"
            print(f"  consent: {card['consent']}{note}")
        for term in terms:
            origin = f" (carried from {term.via})" if term.via else ""
            print(f"  usage terms{origin}: {term.describe()} (checked against the OS user, host, Slurm account, "
                  f"the recipe that runs and the date)")
        for via, stated in sources:
            print(f"  permitted use carried from its source {via}:")
            for line in plain_words(stated):
                print(f"    {line}")
        if codes is None and not terms and not sources and card.get("consent") in (None, ""):
            print("  states no consent, usage terms or DUO codes: what the owner allows is unknown (runs warn and "
                  "record that)")
    return 0


def _source_codes(card, path):
    from aifactory_train.records.consent import _codes_in

    return [(via, stated) for via, stated in _codes_in(card, path, None, 0) if via is not None]


def audit_verify(args: argparse.Namespace) -> int:
    from aifactory_train.records.audit import AUDIT_FILE, verify
    from aifactory_train.errors import DataError

    path = Path(args.path).expanduser()
    log_file = path / AUDIT_FILE if path.is_dir() else path
    if not log_file.is_file():
        raise DataError(f"audit log '{log_file}' does not exist; give the log file or the folder that holds "
                        f"{AUDIT_FILE} (audit.path, or beside the data's card)")
    try:
        verdict = verify(log_file)
    except OSError as err:
        raise DataError(f"audit log '{log_file}' cannot be read ({err.strerror})") from None
    if verdict.ok:
        print(f"ok: {log_file}: {verdict.message}")
        return 0
    print(f"error: audit log '{log_file}': {verdict.message}", file=sys.stderr)
    return 1
