"""A job setting declared once, beside its JobSpec field: its flag, its help, and what a change of it changes.

The common command-line flags (and so the job-file keys, read from the parser), `submit`'s model paths and the job's
identity are all read from these declarations; a setting added with its `setting(...)` is in each of them, and
`tests/test_settings.py` proves every field is declared and that each identity field changes the identity.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass, field
from typing import Any, Callable

OUTPUT = "output"  # changes the outputs: part of the identity while `used` holds of the spec
RUN = "run"  # changes speed or where things are, not outputs: a resumed job may change it freely
MODEL = "model"  # names a model: the job records the model by what it is (its pinned source), not by this name


@dataclass(frozen=True)
class Setting:
    effect: str
    help: str
    used: Callable[[Any], bool] | None = None  # OUTPUT: in the identity only when this holds (None: always)
    flag: str | None = None  # the flag, when not the field's name as one (--format for output_format)
    common: bool = True  # a flag of every job; False: each job's own flags set it (--steps, --model), or another
    # setting does (merge_scale, from --merge-finetune MODEL[:SCALE])
    flag_default: Any = None  # the flag's default, when not the field's (--scores "")
    repeated: bool = False  # a flag given several times, its values a list in order
    scaled: bool = False  # a MODEL given as MODEL[:SCALE]
    recorded: Callable[[Any], dict] | None = None  # MODEL: the part of its value that changes outputs, as identity
    # entries (the LoRAs' scales)
    options: dict = field(default_factory=dict)  # argparse's other arguments: type, choices, metavar, action

    def in_identity(self, spec) -> bool:
        return self.effect == OUTPUT and (self.used is None or self.used(spec))

    def identity_entries(self, name: str, spec) -> dict:
        """What this setting puts in the spec's identity."""
        if self.in_identity(spec):
            return {name: getattr(spec, name)}
        return self.recorded(getattr(spec, name)) if self.recorded else {}


def setting(default: Any = MISSING, *, help: str, effect: str = OUTPUT, used: Callable[[Any], bool] | None = None,
            flag: str | None = None, common: bool = True, flag_default: Any = None, repeated: bool = False,
            scaled: bool = False, recorded: Callable[[Any], dict] | None = None,
            factory: Callable[[], Any] | None = None, **options) -> Any:
    """A JobSpec field and its declaration; `flag` defaults to the field's name as a flag (`--batch-size`)."""
    declared = Setting(effect, help, used, flag, common, flag_default, repeated, scaled, recorded, options)
    if factory is not None:
        return field(default_factory=factory, metadata={"setting": declared})
    return field(default=default, metadata={"setting": declared})


def declared_settings(spec_class) -> dict[str, Setting]:
    """Each field's declaration, in field order; a field without one is refused (it would be in no list)."""
    settings = {}
    for spec_field in dataclasses.fields(spec_class):
        if "setting" not in spec_field.metadata:
            raise TypeError(f"{spec_class.__name__}.{spec_field.name} has no setting(...) declaration")
        settings[spec_field.name] = spec_field.metadata["setting"]
    return settings


def flag_name(name: str, declared: Setting) -> str:
    return declared.flag or "--" + name.replace("_", "-")


def default_of(spec_class, name: str) -> Any:
    spec_field = spec_class.__dataclass_fields__[name]
    return spec_field.default_factory() if spec_field.default_factory is not MISSING else spec_field.default
