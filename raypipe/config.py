"""One typed config for every phase: YAML (with ``extends``) < presets < flags < dotted
``key=value`` overrides -> a validated pydantic model -> a plain dict.

The core sections are in ``raypipe.settings``; each registered plug-in adds its own section
(``teacher.moco.*``, ``student.ofd.*``) from its ``Settings`` model and checks the whole config
with its ``validate``. This module never imports the plug-ins: it reads the registries.
The plain nested dict (``Config.to_dict()``) is what Ray Train gets as ``train_loop_config`` and
what Tune's ``param_space`` is built from; ``Config.from_dict`` turns it back into a validated
config inside workers and trial drivers. Every error is a ``ConfigError`` naming the key (and the
file it came from).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from .errors import ConfigError
from .registry import REGISTRIES, load_plugins
from .settings import (DataConfig, OptimConfig, ResourcesConfig, Section, StudentConfig, TeacherConfig,  # noqa: F401
                       TuneConfig, opt)

# Keys that moved: old dotted key -> new one. Old config files, overrides and records keep working.
MOVED = {"tune.storage": "output_dir", "resources.storage_path": "output_dir"}


class Config(Section):
    name: str = opt("run", "run name: the run folder; re-running a name resumes it")
    output_dir: str = opt("runs", "local folder or s3:// / gs:// URI that holds every run (output_dir/name) and "
                                  "experiment (output_dir/tune.experiment): checkpoints, metrics, models")
    data: DataConfig = Field(default_factory=DataConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)

    @model_validator(mode="after")
    def _plugins(self) -> "Config":
        """Each registered plug-in's section validated by its own model (defaults where absent),
        the selected plug-ins registered, then their own cross-field checks."""
        for section, registry in REGISTRIES.items():
            phase = getattr(self, section)
            models = registry.sections()
            extra = phase.__pydantic_extra__
            unknown = sorted(set(extra) - set(models))
            if unknown:
                raise ConfigError(f"unknown config key {section + '.' + unknown[0]!r}; allowed in {section}: "
                                  f"{sorted([*type(phase).model_fields, *models])}")
            for name, model in models.items():
                value = extra.get(name, {})
                extra[name] = value if isinstance(value, model) else _validate(model, value, f"{section}.{name}.")
        REGISTRIES["teacher"].check(self.teacher.method)
        REGISTRIES["student"].check(self.student.mode)
        for phase, epochs in ((self.teacher, self.teacher.epochs), (self.student, self.student.epochs)):
            if phase.warmup_epochs and phase.warmup_epochs >= epochs:
                key = "teacher" if phase is self.teacher else "student"
                raise ConfigError(f"{key}.warmup_epochs={phase.warmup_epochs} must be < {key}.epochs={epochs}")
        if "/" in self.name or not self.name:
            raise ConfigError(f"name={self.name!r} must be a non-empty folder name without '/'")
        for plugin in selected_plugins(self):
            plugin.validate(self)
        return self

    def global_batch(self, phase: str = "teacher") -> int:
        """Images per optimiser step over all workers (the queue and lr rules are stated in it)."""
        return getattr(self, phase).batch_size * max(1, self.resources.num_workers)

    # ---- conversions -------------------------------------------------------------
    def to_dict(self) -> dict:
        return self.model_dump()

    @classmethod
    def from_dict(cls, raw: dict | None) -> "Config":
        return _validate(cls, migrate(dict(raw or {})), "")

    def with_overrides(self, overrides: dict[str, Any]) -> "Config":
        raw = self.to_dict()
        for key, value in overrides.items():
            set_dotted(raw, key, value)
        return Config.from_dict(raw)

    def dump(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def selected_plugins(cfg: Config) -> list[type]:
    """The method and distiller classes ``cfg`` selects."""
    return [REGISTRIES["teacher"][cfg.teacher.method], REGISTRIES["student"][cfg.student.mode]]


# ---- validation errors as one line naming the key ---------------------------------
WANTS = {"int": "int", "float": "float", "bool": "bool", "list": "list", "string": "str", "dict": "a mapping",
         "model": "a mapping"}
BOUNDS = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"), "less_than_equal": ("<=", "le"),
          "less_than": ("<", "lt")}


def _validate(model: type[BaseModel], raw, prefix: str):
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_explain(exc.errors()[0], prefix)) from None


def _explain(err: dict, prefix: str) -> str:
    key = (prefix + ".".join(str(p) for p in err["loc"]
                             if not str(p).startswith(("function-", "literal[", "bool")))).rstrip(".")
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    if kind == "extra_forbidden":
        return f"unknown config key {key!r}; allowed in {key.rpartition('.')[0] or 'top level'}: {allowed(key)}"
    if kind in ("literal_error", "enum"):
        return f"config key {key!r} = {value!r} is not allowed; choose one of {ctx.get('expected')}"
    if kind in BOUNDS:
        sign, name = BOUNDS[kind]
        return f"config key {key!r} = {value!r} is out of range; allowed: {sign} {ctx.get(name)}"
    if kind == "value_error":
        message = str(ctx.get("error", err["msg"]))
        return f"{key}: {message}" if key else message
    for word, want in WANTS.items():
        if kind.startswith(word):
            return f"config key {key!r} must be of type {want}, got {value!r}"
    return f"config key {key!r} = {value!r}: {err['msg']}"


# ---- the schema as dotted keys ------------------------------------------------------
def section_fields(model: type[BaseModel], dotted: str) -> dict[str, Any]:
    """Field name -> annotation of the section at ``dotted`` (plug-in sections included)."""
    fields = {name: f.annotation for name, f in model.model_fields.items()}
    if dotted in REGISTRIES:
        fields.update(REGISTRIES[dotted].sections())
    return fields


def field_type(key: str):
    """The declared type of a dotted config key, or None if there is no such key."""
    node: Any = Config
    for i, part in enumerate(key.split(".")):
        if not (isinstance(node, type) and issubclass(node, BaseModel)):
            return None
        node = section_fields(node, ".".join(key.split(".")[:i])).get(part)
    return node


def allowed(key: str) -> list[str]:
    parent = field_type(key.rpartition(".")[0]) if "." in key else Config
    return sorted(section_fields(parent, key.rpartition(".")[0])) if parent else []


def migrate(raw: dict, source: str = "") -> dict:
    """Keys of an older layout moved to where they live now (``MOVED`` and each plug-in's
    ``moved``, e.g. teacher.margin -> teacher.moco.margin); a value set at the new key wins."""
    for old, new in moved_keys().items():
        value = get_dotted(raw, old, _MISSING)
        if value is _MISSING:
            continue
        pop_dotted(raw, old)
        if get_dotted(raw, new, _MISSING) is _MISSING:
            set_dotted(raw, new, value, create=True)
    return raw


def moved_keys() -> dict[str, str]:
    out = dict(MOVED)
    for section, registry in REGISTRIES.items():
        for name, cls in registry.items():
            out.update({old: f"{section}.{cls.section or name}.{new}" for old, new in cls.moved.items()})
    return out


_MISSING = object()


def get_dotted(raw: dict, key: str, default: Any = None) -> Any:
    """``raw["teacher"]["moco"]["margin"]`` for ``key="teacher.moco.margin"`` (``default`` where missing)."""
    node = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def pop_dotted(raw: dict, key: str) -> None:
    *sections, name = key.split(".")
    node = get_dotted(raw, ".".join(sections)) if sections else raw
    node.pop(name, None)


def set_dotted(raw: dict, key: str, value: Any, create: bool = False) -> None:
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        if create and part not in node:
            node[part] = {}
        child = node.get(part)
        if isinstance(child, BaseModel):
            child = node[part] = child.model_dump()
        if not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"unknown config key {key!r}: {where!r} is not a section")
        node = child
    node[parts[-1]] = value


def nest(dotted: dict[str, Any]) -> dict:
    """``{"teacher.moco.margin": 0.3}`` -> ``{"teacher": {"moco": {"margin": 0.3}}}``."""
    out: dict = {}
    for key, value in dotted.items():
        set_dotted(out, key, value, create=True)
    return out


def flat_key(key: str) -> str:
    """A dotted key as Tune spells it in flattened configs and ``points_to_evaluate``: teacher/margin."""
    return key.replace(".", "/")


# ---- loading --------------------------------------------------------------------
def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["teacher.moco.margin=0.3", "data.strict=true"]`` -> dict of values. The text of a string
    key is kept as typed (``name=007`` stays "007"); other values are read as YAML."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. teacher.epochs=50)")
        key, text = (part.strip() for part in item.split("=", 1))
        key = moved_keys().get(key, key)
        out[key] = text if field_type(key) is str or not text else yaml.safe_load(text)
    return out


def parse_args_with_overrides(parser, argv: list[str]):
    """``parser.parse_args(argv)``, but ``key=value`` overrides may stand anywhere on the line."""
    args, unknown = parser.parse_known_args(argv)
    stray = [u for u in unknown if u.startswith("-") or "=" not in u or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if unknown:
        args.overrides = [*args.overrides, *unknown]
    return args


PRESETS = Path(__file__).with_name("presets")   # named configs shipped with the package (smoke, laptop)


def read_yaml(path: Path) -> dict:
    """A YAML mapping from a file; a syntax error is one line naming the file, line and column."""
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.MarkedYAMLError as exc:
        mark, start = exc.problem_mark or exc.context_mark, exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        context = (f" ({exc.context} at line {start.line + 1}, column {start.column + 1})"
                   if exc.problem and exc.context and start and start is not mark else "")
        raise ConfigError(f"{where}: YAML syntax error: {exc.problem or exc.context}{context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: YAML syntax error: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return migrate(loaded)


def preset(name: str) -> dict:
    """A preset under raypipe/presets/ as dotted overrides, e.g. {"teacher.epochs": 2}."""
    path = PRESETS / f"{name}.yaml"
    loaded = read_yaml(path)
    _merge(Config().to_dict(), loaded, prefix="", source=str(path))  # unknown keys: an error naming the file
    return dict(_dotted(loaded))


def _dotted(node: dict, prefix: str = ""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _dotted(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """YAML file (optional) + dotted overrides -> validated Config. No Ray is touched."""
    load_plugins()   # first, outside validation: a plug-in that fails to import is named as such
    raw: dict = Config().to_dict()
    source = ""
    if path is not None:
        _merge_file(raw, Path(path), chain=())
        source = str(path)
    if overrides:
        items = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides))
        for key, value in items.items():
            set_dotted(raw, moved_keys().get(key, key), value)
    try:
        return Config.from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}" if source and not str(exc).startswith(source) else str(exc)) from None


def _merge_file(raw: dict, path: Path, chain: tuple) -> None:
    """Merge a YAML file into ``raw``; ``extends: other.yaml`` (relative to it) is merged first."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" + (f" (extended by {chain[-1]})" if chain else ""))
    if path.resolve() in chain:
        raise ConfigError(f"{path}: 'extends' loops back to itself")
    loaded = read_yaml(path)
    parent = loaded.pop("extends", None)
    if parent is not None:
        if not isinstance(parent, str):
            raise ConfigError(f"{path}: 'extends' must be a file name, got {parent!r}")
        _merge_file(raw, path.parent / parent, chain + (path.resolve(),))
    _merge(raw, loaded, prefix="", source=str(path))


def _merge(base: dict, update: dict, prefix: str, source: str) -> None:
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in base:
            raise ConfigError(f"{source}: unknown config key {dotted!r}; allowed: {sorted(base)}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {dotted!r} must be a mapping")
            _merge(base[key], value, prefix=f"{dotted}.", source=source)
        else:
            base[key] = value


def describe() -> list[tuple[str, Any, str]]:
    """(dotted key, default, doc) for every field: what ``raypipe config --keys`` prints."""
    rows = []

    def walk(node: BaseModel, prefix: str):
        fields = type(node).model_fields
        for name, value in {**dict(node), **(node.__pydantic_extra__ or {})}.items():
            if isinstance(value, BaseModel):
                walk(value, prefix + name + ".")
            else:
                rows.append((prefix + name, value, fields[name].description or ""))

    walk(Config(), "")
    return rows


