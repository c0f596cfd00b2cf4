"""Distribution rules: which study database a stable study in the Import database goes to.

A rule (``[[distribute.rules]]`` in the config) names a database (``to``) and attributes to
match (``match``): a string is an exact value, ``{ regex = "..." }`` a regular expression
searched in the value, and ``folder`` a glob on the drop-relative path of any of the study's
files (``*`` crosses folders). Every attribute of a rule must match, each by any of the
study's values (a study has one description but may have several modalities). The first
matching rule wins; a study no rule takes stays in the Import database.
"""

import dataclasses
import fnmatch
import re

from ..errors import ConfigError
from ..models import IMPORT_ID, Instance, Patient, Series, Study

# what a rule may match on: keyword -> how to read the study's values
STUDY_LEVEL = {"StudyDescription": Study.description, "AccessionNumber": Study.accession_number,
               "ReferringPhysicianName": Study.referring_physician, "StudyDate": Study.study_date,
               "PatientID": Patient.patient_id, "PatientName": Patient.name}
SERIES_LEVEL = {"Modality": Series.modality, "SeriesDescription": Series.description,
                "InstitutionName": Series.institution_name, "StationName": Series.station_name}
FOLDER = "folder"
ATTRIBUTES = (*STUDY_LEVEL, *SERIES_LEVEL, FOLDER)


@dataclasses.dataclass(frozen=True)
class Condition:
    attribute: str
    text: str  # as written: the exact value, the regular expression or the glob
    kind: str  # "exact", "regex" or "glob"

    def matches(self, values) -> bool:
        for value in values:
            if self.kind == "exact" and value == self.text:
                return True
            if self.kind == "regex" and re.search(self.text, value or ""):
                return True
            if self.kind == "glob" and fnmatch.fnmatchcase(value or "", self.text):
                return True
        return False

    def __str__(self) -> str:
        shown = {"exact": repr(self.text), "regex": f"/{self.text}/", "glob": repr(self.text)}
        return f"{self.attribute} {'~' if self.kind != 'exact' else '='} {shown[self.kind]}"


@dataclasses.dataclass(frozen=True)
class Rule:
    number: int  # 1 for the first in the config
    to: str
    conditions: tuple
    name: str = ""

    def __str__(self) -> str:
        return f"rule {self.number}{f' ({self.name})' if self.name else ''}"


def parse(raw, where: str = "distribute.rules") -> tuple:
    """The rules of a config, checked; ``ConfigError`` names the rule and key at fault."""
    if not isinstance(raw, list):
        raise ConfigError(f"{where} must be a list of tables ([[{where}]])")
    rules = []
    for number, item in enumerate(raw, 1):
        at = f"{where}[{number}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{at} must be a table")
        unknown = set(item) - {"to", "match", "name"}
        if unknown:
            raise ConfigError(f"unknown key {at}.{sorted(unknown)[0]}; known: to, match, name")
        to, match = item.get("to"), item.get("match")
        if not isinstance(to, str) or not to:
            raise ConfigError(f"{at}.to must name a study database")
        if not isinstance(match, dict) or not match:
            raise ConfigError(f"{at}.match must be a table of attributes to match, for example "
                              '{ Modality = "MR" }')
        rules.append(Rule(number, to, tuple(_condition(f"{at}.match", k, v) for k, v in match.items()),
                          str(item.get("name", ""))))
    return tuple(rules)


def _condition(at: str, attribute: str, value) -> Condition:
    if attribute not in ATTRIBUTES:
        raise ConfigError(f"{at}.{attribute}: unknown attribute; rules match on "
                          f"{', '.join(ATTRIBUTES)}")
    if attribute == FOLDER:
        if not isinstance(value, str):
            raise ConfigError(f"{at}.{attribute} must be a glob (a string)")
        return Condition(attribute, value, "glob")
    if isinstance(value, str):
        return Condition(attribute, value, "exact")
    if isinstance(value, dict) and set(value) == {"regex"} and isinstance(value["regex"], str):
        try:
            re.compile(value["regex"])
        except re.error as exc:
            raise ConfigError(f"{at}.{attribute}: invalid regular expression: {exc}") from None
        return Condition(attribute, value["regex"], "regex")
    raise ConfigError(f'{at}.{attribute} must be a value ("MR") or {{ regex = "..." }}')


def study_values(study_id: int) -> dict:
    """Everything a rule can ask of one study in the Import database."""
    study = (Study.select(Study, Patient).join(Patient).where(Study.id == study_id).get())
    values = {"StudyDescription": [study.description], "AccessionNumber": [study.accession_number],
              "ReferringPhysicianName": [study.referring_physician], "StudyDate": [study.study_date],
              "PatientID": [study.patient.patient_id], "PatientName": [study.patient.name]}
    held = Series.select().where((Series.study == study_id) & Series.id.in_(
        Instance.select(Instance.series).where(Instance.database_id == IMPORT_ID)))
    for keyword, column in SERIES_LEVEL.items():
        values[keyword] = sorted({getattr(s, column.name) for s in held})
    sources = (Instance.select(Instance.source).join(Series)
               .where((Series.study == study_id) & (Instance.database_id == IMPORT_ID)))
    values[FOLDER] = sorted({i.source for i in sources})
    return values


def choose(rules, values: dict) -> tuple:
    """The first rule that takes a study with these values, and why (or None, why not)."""
    for rule in rules:
        failed = [c for c in rule.conditions if not c.matches(values.get(c.attribute, []))]
        if not failed:
            return rule, f"{rule}: " + ", ".join(str(c) for c in rule.conditions)
    return None, "no rule matches" if rules else "no rules"


def check_targets(rules, known) -> None:
    """A rule naming a database that does not exist is a config error."""
    for rule in rules:
        if rule.to == "import":
            raise ConfigError(f"distribute.rules[{rule.number}].to: rules move studies out of the "
                              "Import database; name a study database")
        if rule.to not in known:
            raise ConfigError(f"distribute.rules[{rule.number}].to: no study database named "
                              f"{rule.to!r} (there are: {', '.join(known)}); create it with "
                              f"dicom-watcher databases create {rule.to}")
