"""Consent as codes: a data card's permitted use in the GA4GH Data Use Ontology (DUO), checked against the purpose a
run declares (``run.purpose``).

A card states its codes under ``duo``: one data use permission and any number of modifiers, each a code or a
mapping of the code and its parameters::

    duo:
      - DUO:0000006                      # health or medical or biomedical research
      - DUO:0000046                      # non-commercial use only
      - DUO:0000021                      # ethics approval required
      - {code: DUO:0000028, institutions: [UMCG, RUG]}
      - {code: DUO:0000025, until: 2027-06-30}

A run declares what it is for (configs/train.yaml, ``run.purpose``): ``use`` (research | commercial),
``organisation`` (academic | non_profit | company | government), ``area`` (health | other), ``project``,
``disease`` (an ontology id such as MONDO:0005148), ``ethics_approval`` (the approval's reference) and
``institution``. `check_codes` refuses a use the codes do not permit, naming the code and the card, before
anything is read, tracked or queued (it runs inside ``usage_terms.check_usage``).

What is checked against what: the declared purpose is what the user states; aift cannot verify that a project,
an ethics approval or an institution is real, only that it was declared, that the card's list names it, and that
the declaration is recorded with the run. The user (DUO:0000026) comes from the operating system, the date
(DUO:0000025) from the clock. Codes that describe an obligation aift cannot check (publication, collaboration,
return of results, a geographic region, a research type other than health) are reported as obligations: printed,
warned about and recorded, never silently dropped.

The codes, shorthands and labels are those of DUO's ``duo.csv`` (http://purl.obolibrary.org/obo/duo/duo.csv), as
in the DUO repository (github.com/EBISPOT/DUO, file ``duo.csv`` at commit 726b06e6, the labels since the
v2020-02-03 release, which relabelled "consent code" as "data use limitation"). DUO:0000001 and DUO:0000017 are
the ontology's categories, not codes a card states.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from aifactory_train.errors import ConfigError, DataError

DUO_RELEASE = "duo.csv of github.com/EBISPOT/DUO at commit 726b06e6 (labels of the v2020-02-03 release and later)"
CARD_KEY = "duo"

USES = ("research", "commercial")
ORGANISATIONS = ("academic", "non_profit", "company", "government")
AREAS = ("health", "other")
PURPOSE_KEYS = ("use", "organisation", "area", "project", "disease", "ethics_approval", "institution")
ONTOLOGY_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_]*:[A-Za-z0-9_.-]+$")  # MONDO:0005148, DOID:9352, ICD10:E11


@dataclass(frozen=True)
class Code:
    """One DUO code: its id, shorthand and label (DUO's), whether it is a permission or a modifier, what a run's
    purpose must declare under it (``needs``), which parameters a card may give it (``params``, the first
    ``required`` of them must be given), and what it means in plain words. ``checked``: False for an obligation aift
    cannot check (it is reported and recorded)."""

    id: str
    shorthand: str
    label: str
    kind: str  # "permission" | "modifier"
    plain: str
    needs: tuple[str, ...] = ()
    params: tuple[str, ...] = ()
    required: int = 0
    checked: bool = True


DUO: dict[str, Code] = {c.id: c for c in [
    # permissions: what the data may be used for (a card states one)
    Code("DUO:0000004", "NRES", "no restriction", "permission", "any use, by anyone"),
    Code("DUO:0000042", "GRU", "general research use", "permission",
         "research of any kind (not a commercial product or service)", needs=("use",)),
    Code("DUO:0000006", "HMB", "health or medical or biomedical research", "permission",
         "health, medical or biomedical research only (not population origins or ancestry)", needs=("use", "area")),
    Code("DUO:0000007", "DS", "disease specific research", "permission",
         "research on the named disease(s) only", needs=("use", "disease"), params=("disease",), required=1),
    Code("DUO:0000011", "POA", "population origins or ancestry research only", "permission",
         "research on population origins or ancestry only (aift cannot tell the research topic: the user's "
         "obligation)", needs=("use",), checked=False),
    # modifiers: conditions on that use
    Code("DUO:0000046", "NCU", "non-commercial use only", "modifier",
         "non-commercial use only: no commercial product or service", needs=("use",)),
    Code("DUO:0000045", "NPU", "not for profit organisation use only", "modifier",
         "use by not-for-profit organisations only (academic, non-profit, government; not companies)",
         needs=("organisation",)),
    Code("DUO:0000018", "NPUNCU", "not for profit, non commercial use only", "modifier",
         "non-commercial use by not-for-profit organisations only", needs=("use", "organisation")),
    Code("DUO:0000021", "IRB", "ethics approval required", "modifier",
         "an ethics (IRB/ERB) approval is required; the run names its reference", needs=("ethics_approval",)),
    Code("DUO:0000012", "RS", "research specific restrictions", "modifier",
         "studies of the research type the card names only; the run names its project", needs=("project",),
         params=("research_type", "projects")),
    Code("DUO:0000027", "PS", "project specific restriction", "modifier",
         "use within an approved project only", needs=("project",), params=("projects",)),
    Code("DUO:0000025", "TS", "time limit on use", "modifier", "use until the date the card gives",
         params=("until",), required=1),
    Code("DUO:0000026", "US", "user specific restriction", "modifier", "use by the approved users only",
         params=("users",), required=1),
    Code("DUO:0000028", "IS", "institution specific restriction", "modifier",
         "use within the approved institutions only", needs=("institution",), params=("institutions",), required=1),
    Code("DUO:0000029", "RTN", "return to database or resource", "modifier",
         "derived or enriched data must be returned to the resource (the user's obligation)", checked=False),
    Code("DUO:0000019", "PUB", "publication required", "modifier",
         "results must be made available to the scientific community (the user's obligation)", checked=False),
    Code("DUO:0000020", "COL", "collaboration required", "modifier",
         "collaboration with the primary study investigators is required (the user's obligation)", checked=False),
    Code("DUO:0000024", "MOR", "publication moratorium", "modifier",
         "no publication before the date the card gives (the user's obligation)", params=("until",),
         checked=False),
    Code("DUO:0000022", "GS", "geographical restriction", "modifier",
         "use within the region the card names only (the user's obligation; the card's usage.hosts can pin "
         "machines)", params=("region",), checked=False),
    Code("DUO:0000043", "CC", "clinical care use", "modifier", "clinical use and care is allowed too"),
    Code("DUO:0000044", "NPOA", "population origins or ancestry research prohibited", "modifier",
         "no population origins or ancestry research (the user's obligation)", checked=False),
    Code("DUO:0000015", "NMDS", "no general methods research", "modifier",
         "no methods development research, e.g. of software or algorithms (the user's obligation)", checked=False),
    Code("DUO:0000016", "GSO", "genetic studies only", "modifier",
         "genetic studies only (the user's obligation)", checked=False),
]}
CATEGORIES = {"DUO:0000001": "data use permission", "DUO:0000017": "data use modifier"}
PERMISSIONS = [c for c in DUO.values() if c.kind == "permission"]
NOT_FOR_PROFIT = ("academic", "non_profit", "government")


@dataclass
class PurposeConfig:
    """``run.purpose``: what this run is for, declared by the user, checked against the data cards' DUO codes."""

    use: Optional[str] = None  # research | commercial
    organisation: Optional[str] = None  # academic | non_profit | company | government
    area: Optional[str] = None  # health (health/medical/biomedical) | other
    project: Optional[str] = None
    disease: Optional[str] = None  # an ontology id: MONDO:0005148
    ethics_approval: Optional[str] = None  # the approval's reference
    institution: Optional[str] = None

    def check(self) -> None:
        for key, valid in (("use", USES), ("organisation", ORGANISATIONS), ("area", AREAS)):
            value = getattr(self, key)
            if value is not None and value not in valid:
                raise ConfigError(f"config key 'run.purpose.{key}': {value!r} is not valid; valid values: "
                                  f"{', '.join(valid)} (or null)")
        for key in ("project", "ethics_approval", "institution", "disease"):
            value = getattr(self, key)
            if value is not None and not str(value).strip():
                raise ConfigError(f"config key 'run.purpose.{key}': {value!r} is not valid; expected a non-empty "
                                  f"name or null")
        if self.disease is not None and not ONTOLOGY_ID.match(str(self.disease)):
            raise ConfigError(f"config key 'run.purpose.disease': {self.disease!r} is not valid; expected a disease "
                              f"ontology id such as MONDO:0005148 or DOID:9352")


@dataclass
class RunSection:
    """``run``: what the run declares about itself."""

    purpose: PurposeConfig = field(default_factory=PurposeConfig)


def purpose_of(config: Any) -> dict[str, Any]:
    """The declared purpose of a config (resolved dict, DictConfig or typed), every key present (None: not
    declared)."""
    run = (config.get("run") if isinstance(config, dict) else getattr(config, "run", None)) if config is not None \
        else None
    purpose = (run.get("purpose") if isinstance(run, dict) else getattr(run, "purpose", None)) if run else None
    if purpose is None:
        return {key: None for key in PURPOSE_KEYS}
    get = purpose.get if isinstance(purpose, dict) else (lambda k: getattr(purpose, k, None))
    return {key: (None if get(key) is None else str(get(key))) for key in PURPOSE_KEYS}


# -- the card's codes ------------------------------------------------------------------------------------------
@dataclass
class StatedCode:
    code: Code
    params: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.code.id, "label": self.code.label, **({"params": self.params} if self.params else {})}

    def describe(self) -> str:
        text = f"{self.code.id} ({self.code.shorthand}, {self.code.label}): {self.code.plain}"
        if self.params:
            text += " [" + "; ".join(f"{k}: {_text(v)}" for k, v in self.params.items()) + "]"
        return text


def _text(value: Any) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def parse_codes(value: Any, card: Any) -> list[StatedCode]:
    """A card's ``duo`` list, checked: an unknown code, a parameter of the wrong kind or missing, or a card without
    one permission is an error naming the card, the key and what would be valid."""
    where = f"data card '{card}': {CARD_KEY}"
    valid = "valid codes: " + ", ".join(f"{c.id} ({c.shorthand})" for c in DUO.values())
    if not isinstance(value, list) or not value:
        raise DataError(f"{where} must be a non-empty list of DUO codes (e.g. [DUO:0000042, DUO:0000046]), not "
                        f"{value!r}")
    stated: list[StatedCode] = []
    for n, item in enumerate(value):
        params = dict(item) if isinstance(item, dict) else {}
        code_id = params.pop("code", None) if isinstance(item, dict) else item
        if not isinstance(code_id, str):
            raise DataError(f"{where}[{n}] must be a code (DUO:0000042) or a mapping with 'code' and its "
                            f"parameters, not {item!r}")
        code_id = code_id.strip().upper().replace("_", ":")  # DUO_0000042, the OBO IRI's spelling, is the same code
        if code_id in CATEGORIES:
            raise DataError(f"{where}[{n}]: {code_id} ({CATEGORIES[code_id]}) is DUO's category, not a code to "
                            f"state; {valid}")
        code = DUO.get(code_id)
        if code is None:
            raise DataError(f"{where}[{n}]: {item!r} is not a DUO code aift knows ({DUO_RELEASE}); {valid}")
        unknown = sorted(set(params) - set(code.params), key=str)
        if unknown:
            raise DataError(f"{where}[{n}] {code.id} ({code.label}) has unknown parameter(s) {unknown}; valid: "
                            f"{', '.join(code.params) or 'none'}")
        for key in code.params[:code.required]:
            if params.get(key) in (None, "", []):
                raise DataError(f"{where}[{n}] {code.id} ({code.label}) needs '{key}' (e.g. {_example(key)})")
        stated.append(StatedCode(code, {k: _param(k, v, f"{where}[{n}] {code.id}.{k}") for k, v in params.items()}))
    permissions = [s.code for s in stated if s.code.kind == "permission"]
    if len(permissions) != 1:
        raise DataError(f"{where} states {len(permissions)} data use permissions "
                        f"({', '.join(c.id for c in permissions) or 'none'}); a card states exactly one of "
                        f"{', '.join(f'{c.id} ({c.label})' for c in PERMISSIONS)}, plus modifiers")
    if len({s.code.id for s in stated}) != len(stated):
        raise DataError(f"{where} states a code twice; give each code once, with all its parameters")
    return stated


def _example(key: str) -> str:
    return {"disease": "{code: DUO:0000007, disease: [MONDO:0005148]}", "until": "{code: DUO:0000025, until: "
            "2027-06-30}", "users": "{code: DUO:0000026, users: [alice]}",
            "institutions": "{code: DUO:0000028, institutions: [UMCG]}"}.get(key, key)


def _param(key: str, value: Any, where: str) -> Any:
    if key == "until":
        text = value.isoformat() if isinstance(value, datetime.date) else value
        try:
            return datetime.date.fromisoformat(str(text)).isoformat()
        except ValueError:
            raise DataError(f"{where} must be a date (YYYY-MM-DD), not {value!r}") from None
    if key in ("research_type", "region"):
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where} must be a text, not {value!r}")
        return value
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and v.strip() for v in values):
        raise DataError(f"{where} must be a non-empty list of names, not {value!r}")
    if key == "disease":
        bad = [v for v in values if not ONTOLOGY_ID.match(v)]
        if bad:
            raise DataError(f"{where}: {bad[0]!r} is not a disease ontology id; expected e.g. MONDO:0005148")
    return values


def card_codes(card: dict[str, Any], path: Any) -> list[StatedCode] | None:
    """The codes a card (mapping) states, checked; None when it states none."""
    return None if card.get(CARD_KEY) is None else parse_codes(card[CARD_KEY], path)


# -- the check -------------------------------------------------------------------------------------------------
def check_codes(stated: list[StatedCode], card: Any, purpose: dict[str, Any], user: str,
                today: datetime.date) -> list[str]:
    """Refuse (DataError naming the card and every code the purpose breaks) a use the codes do not permit; return
    the obligations aift could not check, as text."""
    where = f"data card '{card}'"
    for s in stated:  # first what the run must declare: a purpose that says nothing cannot be checked
        missing = [k for k in s.code.needs if purpose.get(k) in (None, "")]
        if s.code.id == "DUO:0000006" and purpose.get("disease"):
            missing = [k for k in missing if k != "area"]  # a disease-specific study is health research
        if missing:
            key = missing[0]
            raise DataError(f"{where} states {s.code.id} ({s.code.label}), which needs config key "
                            f"'run.purpose.{key}'; give run.purpose.{key}={_valid(key)}")
    broken: list[str] = []
    for s in stated:
        reason = _breaks(s, purpose, user, today)
        if reason:
            broken.append(f"{s.code.id} ({s.code.label}): {reason}")
    if broken:
        raise DataError(f"{where} does not permit this use: {'; '.join(broken)}")
    return [s.describe() for s in stated if not s.code.checked]


def _valid(key: str) -> str:
    return {"use": "|".join(USES), "organisation": "|".join(ORGANISATIONS), "area": "|".join(AREAS),
            "disease": "<ontology id, e.g. MONDO:0005148>", "ethics_approval": "<the approval's reference>",
            "project": "<project id>", "institution": "<institution>"}[key]


def _breaks(s: StatedCode, purpose: dict[str, Any], user: str, today: datetime.date) -> str | None:
    cid, p = s.code.id, s.params
    use, org = purpose.get("use"), purpose.get("organisation")
    if cid in ("DUO:0000042", "DUO:0000006", "DUO:0000007", "DUO:0000011") and use != "research":
        return f"research use only, and run.purpose.use is '{use}'"
    if cid == "DUO:0000006" and not purpose.get("disease") and purpose.get("area") != "health":
        return f"health/medical/biomedical research only, and run.purpose.area is '{purpose.get('area')}'"
    if cid == "DUO:0000007" and purpose.get("disease") not in p["disease"]:
        return (f"research on {_text(p['disease'])} only, and run.purpose.disease is '{purpose.get('disease')}' "
                f"(compared as ids: a narrower term of the listed disease must be listed too)")
    if cid in ("DUO:0000046", "DUO:0000018") and use != "research":
        return f"non-commercial use only, and run.purpose.use is '{use}'"
    if cid in ("DUO:0000045", "DUO:0000018") and org not in NOT_FOR_PROFIT:
        return f"not-for-profit organisations only, and run.purpose.organisation is '{org}'"
    if cid in ("DUO:0000012", "DUO:0000027") and p.get("projects") and purpose.get("project") not in p["projects"]:
        return f"projects {_text(p['projects'])} only, and run.purpose.project is '{purpose.get('project')}'"
    if cid == "DUO:0000028" and purpose.get("institution") not in p["institutions"]:
        return (f"institutions {_text(p['institutions'])} only, and run.purpose.institution is "
                f"'{purpose.get('institution')}'")
    if cid == "DUO:0000026" and user not in p["users"]:
        return f"users {_text(p['users'])} only, and this is user '{user}' (the operating system's)"
    if cid == "DUO:0000025" and today > datetime.date.fromisoformat(p["until"]):
        return f"use until {p['until']} only, and today is {today.isoformat()}"
    return None


def plain_words(stated: list[StatedCode]) -> list[str]:
    """What the codes permit, one line each, and what a run must declare to use the data."""
    lines = [s.describe() for s in stated]
    needs = sorted({k for s in stated for k in s.code.needs}, key=PURPOSE_KEYS.index)
    if needs:
        lines.append("a run must declare: " + ", ".join(f"run.purpose.{k}" for k in needs))
    obligations = [s.code.id for s in stated if not s.code.checked]
    if obligations:
        lines.append(f"not checked by aift (the user's obligation, recorded with each run): {', '.join(obligations)}")
    return lines


# -- every card of a use -----------------------------------------------------------------------------------------
_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    import logging

    if message not in _WARNED:  # once per process: the CLI's preflight and the run both check
        _WARNED.add(message)
        logging.getLogger(__name__).warning("%s", message)


def _codes_in(card: dict[str, Any], path: Any, via: str | None, depth: int) -> list[tuple[str | None, list]]:
    """(source card or None, codes) for the card and every source card a derived dataset carries."""
    found = [] if card.get(CARD_KEY) is None else [(via, parse_codes(card[CARD_KEY], path if via is None else
                                                                      f"{path}' derived_from '{via}"))]
    derived = card.get("derived_from")
    sources = derived.get("cards") if isinstance(derived, dict) else None
    if depth <= 20 and isinstance(sources, list):  # its shape is checked with the usage terms (usage_terms)
        for source in sources:
            if isinstance(source, dict) and isinstance(source.get("card"), dict):
                found += _codes_in(source["card"], path, str(source.get("path")), depth + 1)
    return found


def check_purpose_codes(cards: list, config: Any, user: str, today: datetime.date) -> dict[str, Any]:
    """The DUO codes of every card in ``cards`` (and of the sources a derived card carries) checked against the
    purpose ``config`` declares; returns what the run records: the purpose, the codes per card, the obligations
    aift could not check. A card whose consent is free text only is warned about: it cannot be checked."""
    from aifactory_train.records.usage_terms import load_datacard

    purpose = purpose_of(config)
    PurposeConfig(**purpose).check()  # also where the config was not validated (a data tool's resolved dict)
    listed, obligations = [], []
    for path in cards:
        card = load_datacard(path)
        found = _codes_in(card, path, None, 0)
        for via, stated in found:
            where = path if via is None else f"{path}' derived_from '{via}"
            obligations += check_codes(stated, where, purpose, user, today)
            listed.append({"card": str(path), **({"via": via} if via else {}),
                           "codes": [s.as_dict() for s in stated]})
        if not found and card.get("consent") not in (None, ""):
            _warn_once(f"data card '{path}': consent is free text ({str(card['consent'])[:80]!r}); aift cannot check "
                       f"a run against it. State it as DUO codes ({CARD_KEY}: [...], see `aift data card check`) to "
                       f"have it enforced")
    for line in obligations:
        _warn_once(f"data use obligation aift cannot check (recorded with the run): {line}")
    return {"purpose": purpose, "consent_codes": listed, "obligations": obligations}


def codes_summary(consent_codes: list[dict[str, Any]]) -> str:
    """One line: each card's codes (``DUO:0000042 DUO:0000046 (card)``), or that no card states any."""
    if not consent_codes:
        return "none stated"
    return "; ".join(" ".join(c["id"] for c in entry["codes"]) + f" ({entry['card']}" +
                     (f" from {entry['via']})" if entry.get("via") else ")") for entry in consent_codes)


def purpose_summary(purpose: dict[str, Any]) -> str:
    declared = [f"{k}={v}" for k, v in purpose.items() if v not in (None, "")]
    return "; ".join(declared) or "not declared"


def provenance_entry(usage: dict[str, Any] | None) -> dict[str, Any]:
    """What a model's provenance (every checkpoint, every export, the registered version's tags) carries of the
    use its data was put to: the declared purpose, the cards' DUO codes, the obligations, who and which recipe."""
    if not usage:
        return {}
    return {"usage": {"purpose": usage.get("purpose"), "duo": usage.get("consent_codes") or [],
                      "obligations": usage.get("obligations") or [], "recipe": usage.get("recipe"),
                      "user": usage.get("user"), "cards": [c["path"] for c in usage.get("cards", [])]}}


def provenance_tags(document: dict[str, Any]) -> dict[str, str]:
    """``aift.usage.duo`` and ``aift.usage.purpose`` of a provenance document (ONNX metadata, registry tags)."""
    usage = document.get("usage")
    if not isinstance(usage, dict):
        return {}
    return {"aift.usage.duo": codes_summary(usage.get("duo") or []),
            "aift.usage.purpose": purpose_summary(usage.get("purpose") or {})}
