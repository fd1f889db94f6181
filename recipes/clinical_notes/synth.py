"""`aift data synth clinical_notes`: Dutch-style outpatient notes about invented patients, as JSONL splits.

Every note carries the identifiers a real note would (patient and doctor names, birth and visit dates, age,
BSN, phone number, address, hospital), so the de-identification step has something to find; the summary is
derivable from the clinical content of the note (complaint, duration, department, finding, medication,
follow-up), so a small model can learn to write it. The data card says the data is *not* de-identified:
train on the output of `aift data deidentify`, or with ``data.deidentify=inline``.

``generate_records`` also returns what was planted in each note, for the tests that check de-identification
finds all of it; that list is never written to disk.
"""

from __future__ import annotations

import json
from datetime import date, timedelta
from pathlib import Path
from random import Random
from typing import Any

from aifactory_train.recipe import DataError
from aifactory_train.recipe import prepare_output_folder, write_datacard

SPLIT_FRACTIONS = {"train": 1.0, "val": 0.15, "test": 0.15}
DEFAULT_SIZE = 400
VARIANTS = ("jsonl", "tagged")  # tagged: identifiers written as de-identification tags from the start

FIRST_NAMES = ["Jan", "Pieter", "Klaas", "Hendrik", "Johanna", "Maria", "Anna", "Sietske", "Geert", "Willem",
               "Femke", "Marloes", "Bram", "Sanne", "Lotte", "Joost", "Anouk", "Ruben", "Eva", "Thijs"]
SURNAMES = ["de Vries", "Jansen", "Bakker", "Visser", "Smit", "Meijer", "de Boer", "Mulder", "de Groot", "Bos",
            "Vos", "Peters", "Hendriks", "Dijkstra", "Postma", "Hoekstra", "Kuipers", "Veenstra"]
STREETS = ["Hoofdstraat", "Kerkstraat", "Stationsweg", "Molenweg", "Dorpsstraat", "Zuiderdiep", "Herestraat",
           "Schoolstraat", "Julianastraat", "Oosterweg"]
CITIES = ["Groningen", "Assen", "Leeuwarden", "Emmen", "Zwolle", "Winschoten", "Delfzijl", "Veendam"]
HOSPITALS = ["UMCG", "Martini Ziekenhuis", "Ommelander Ziekenhuis", "Antonius Ziekenhuis", "Wilhelmina Ziekenhuis Assen"]
MONTHS = ["januari", "februari", "maart", "april", "mei", "juni", "juli", "augustus", "september", "oktober",
          "november", "december"]
DEPARTMENTS = ["cardiologie", "longziekten", "neurologie", "interne geneeskunde", "orthopedie", "maag-darm-lever"]
COMPLAINTS = ["pijn op de borst", "kortademigheid", "hoofdpijn", "buikpijn", "rugpijn", "duizeligheid",
              "hoesten", "vermoeidheid"]
FINDINGS = ["een bloeddruk van 150/95", "een saturatie van 93 procent", "een normale auscultatie",
            "drukpijn in de bovenbuik", "een beperkte beweeglijkheid", "een verhoogd CRP"]
MEDICATIONS = ["metoprolol", "paracetamol", "amoxicilline", "omeprazol", "ibuprofen", "prednison", "salbutamol"]
DOSES = ["25 mg", "50 mg", "100 mg", "500 mg", "1000 mg"]
FOLLOW_UPS = ["controle over 2 weken", "controle over 6 weken", "terugverwijzing naar de huisarts",
              "telefonische controle over 1 week", "aanvullend bloedonderzoek"]


def bsn(rng: Random) -> str:
    """A 9-digit number that passes the BSN eleven-test (sum of digits x 9..2, minus the last, divisible by 11)."""
    while True:
        digits = [rng.randint(1, 9)] + [rng.randint(0, 9) for _ in range(7)]
        total = sum(d * w for d, w in zip(digits, range(9, 1, -1)))
        last = total % 11
        if last <= 9:
            return "".join(map(str, digits + [last]))


def _long_date(day: date) -> str:
    return f"{day.day} {MONTHS[day.month - 1]} {day.year}"


def make_record(rng: Random) -> dict[str, Any]:
    first, surname = rng.choice(FIRST_NAMES), rng.choice(SURNAMES)
    title = rng.choice(["Dhr.", "Mevr."])
    doctor = f"dr. {rng.choice('ABCDEGHJKLMPRSTW')}. {rng.choice(SURNAMES)}"
    visit = date(2019, 1, 1) + timedelta(days=rng.randrange(2400))
    born = visit - timedelta(days=rng.randrange(20 * 365, 85 * 365))
    age = (visit - born).days // 365
    number = bsn(rng)
    phone = rng.choice([f"06-{rng.randrange(10**7, 10**8)}", f"050-{rng.randrange(10**6, 10**7)}"])
    street = f"{rng.choice(STREETS)} {rng.randint(1, 180)}"
    postcode = f"{rng.randint(9000, 9999)} {rng.choice('ABCDEGHJKLMNPRSTVWXZ')}{rng.choice('ABCDEGHJKLMNPRSTVWXZ')}"
    city = rng.choice(CITIES)
    hospital = rng.choice(HOSPITALS)
    department, complaint = rng.choice(DEPARTMENTS), rng.choice(COMPLAINTS)
    amount = rng.randint(2, 9)
    duration = f"{amount} {rng.choice(['dagen', 'weken'])}"
    finding, medication, dose, follow_up = (rng.choice(FINDINGS), rng.choice(MEDICATIONS), rng.choice(DOSES),
                                            rng.choice(FOLLOW_UPS))
    visit_text = _long_date(visit) if rng.random() < 0.5 else visit.strftime("%d-%m-%Y")
    sentences = [
        f"{title} {first} {surname}, geboren {born.strftime('%d-%m-%Y')} ({age} jaar), BSN {number}.",
        f"Adres: {street}, {postcode} {city}. Telefoon {phone}.",
        f"Op {visit_text} gezien op de polikliniek {department} van het {hospital} door {doctor}.",
        f"Patient meldt {complaint} sinds {duration}.",
        f"Bij lichamelijk onderzoek {finding}.",
        f"Beleid: start {medication} {dose}, {follow_up}.",
    ]
    note = " ".join(sentences)
    tagged = note
    for original, tag in ((f"{title} {first} {surname}", "[PERSOON-1]"), (doctor, "[PERSOON-2]"),
                          (born.strftime("%d-%m-%Y"), "[DATUM-1]"), (visit_text, "[DATUM-2]"),
                          (f"({age} jaar)", "([LEEFTIJD-1] jaar)"), (number, "[BSN-1]"), (phone, "[TELEFOONNUMMER-1]"),
                          (street, "[LOCATIE-1]"), (f"{postcode} {city}", "[LOCATIE-2]"), (hospital, "[ZIEKENHUIS-1]")):
        tagged = tagged.replace(original, tag, 1)
    summary = (f"{complaint[0].upper()}{complaint[1:]} sinds {duration}, gezien bij {department}. "
               f"Onderzoek: {finding}. Beleid: {medication} {dose}, {follow_up}.")
    planted = {
        "persoon": [f"{first} {surname}", doctor.split(". ", 1)[1]],
        "datum": [born.strftime("%d-%m-%Y"), visit_text],
        "leeftijd": [f"({age} jaar)"],  # the bare number may also be a dose
        "bsn": [number],
        "telefoonnummer": [phone],
        "locatie": [street, f"{postcode} {city}"],
        "ziekenhuis": [hospital],
    }
    return {"note": note, "summary": summary, "planted": planted, "tagged_note": tagged}


def generate_records(count: int, seed: int) -> list[dict[str, Any]]:
    rng = Random(seed)
    return [make_record(rng) for _ in range(count)]


def split_sizes(size: int) -> dict[str, int]:
    return {split: max(2, int(round(size * fraction))) for split, fraction in SPLIT_FRACTIONS.items()}


def synthesize(out: str | Path, size: int | None = None, seed: int = 0, variant: str | None = None,
               overwrite: bool = False) -> Path:
    """Write ``<split>.jsonl`` files (fields ``note`` and ``summary``) and a data card under ``out``.

    ``variant="tagged"`` writes the notes as de-identification would leave them (tags such as ``[PERSOON-1]``
    instead of invented identifiers, which are never written), marked de-identified: for benchmarks and quick
    demos without deduce.
    """
    variant = variant or "jsonl"
    if variant not in VARIANTS:
        raise DataError(f"--variant '{variant}' is not valid for clinical_notes; valid variants: {', '.join(VARIANTS)}")
    size = DEFAULT_SIZE if size is None else size
    if size < 2:
        raise DataError(f"--size {size} is too small: at least 2 training notes are needed")
    out = prepare_output_folder(out, overwrite, owned=tuple(f"{split}.jsonl" for split in SPLIT_FRACTIONS))
    for offset, (split, count) in enumerate(split_sizes(size).items()):
        records = generate_records(count, seed=seed * 1000 + offset)
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for record in records:
                note = record["tagged_note"] if variant == "tagged" else record["note"]
                handle.write(json.dumps({"note": note, "summary": record["summary"]}, ensure_ascii=False))
                handle.write("\n")
    card = {
        "name": "clinical_notes synthetic outpatient notes",
        "owner": "AI Factory Groningen (generated demo data)",
        "license": "CC0-1.0",
        "consent": "not applicable: invented patients (the raw notes carry invented identifiers by design)",
        "source": f"aift data synth clinical_notes --size {size} --seed {seed}",
        "description": "Dutch-style notes with names, dates, BSNs, phone numbers, addresses; summary per note",
        "deidentified": "true" if variant == "tagged" else "false",
    }
    if variant == "tagged":
        card["deidentification"] = "synthetic: identifiers were generated as tags, never as text"
        card["consent"] = "not applicable: invented patients, no identifiers"
    write_datacard(out, card)
    return out
