"""Each flag declared once, on its config field: default, help, and the range or choices it allows.

    @dataclass
    class GRPOConfig:
        beta: float = flag(0.01, "KL coefficient; 0 skips the reference model", low=0.0)

`add_flags(parser, GRPOConfig)` builds the CLI from those declarations, `config_from_args` makes the
config back from the parsed flags, and `check(cfg)` stops a value outside its range with one line,
`error: --flag must be ... (got X)`, before any model loads (also for configs built in Python).
NaN and inf are out of range everywhere. Rules between flags (`--resume` with `--overwrite`, a device the
machine lacks) are declared beside them, in the class's `RULES` (`Rule`), and `check` applies them too.
`--resume` takes every setting not given from the run's run_config.json (`resume_from_run_config`), and
`resume_changes` refuses any that would change the run unless its flag says `on_resume="may"`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from common.config_keys import resolve_keys
from common.errors import UserError, fail
from common.run_files import RUN_CONFIG

DEVICE = (r"cpu|cuda(:[0-9]+)?", "cpu, cuda or cuda:N")  # `text=` of every --device flag
FINETUNE = ("full", "lora")  # `choices=` of both trainers' --finetune: every weight, or LoRA adapters
CUDA_GRAPHS = ("auto", "on", "off")  # `choices=` of --cuda_graphs: on CUDA (the default), always (CUDA only), never
FINETUNE_HELP = "what trains: full (every weight) or lora (adapters on a frozen base; with --use_4bit, QLoRA)"


def flag(default: Any, help: str, *, low: float | None = None, high: float | None = None,  # noqa: A002
         above: float | None = None, choices: tuple[str, ...] | None = None, group: str | None = None,
         name: str | None = None, cli: bool = True, required: bool = False,
         text: tuple[str, str] | None = None, bare: str | None = None, on_resume: str | None = None) -> Any:
    """A dataclass field that is also a CLI flag. `low`/`high`: inclusive bounds; `above`: exclusive
    lower bound; `text`: (regular expression, its description in words) a text value must match;
    `name`: the flag's spelling when not `--<field>` (`--no_progress` for a True default turns the
    field off; `help` says what the field does when on, and --help shows it as "turns off: <help>");
    `cli=False`: a field with no flag (set by the code that calls the trainer); `required`:
    the CLI needs it (the field's default is then only the Python API's); `bare`: the value of the
    flag given without one (`--cuda_graphs` alone is `--cuda_graphs on`);
    `on_resume`: what `--resume` does with it (`resume_changes`): None, the run's own setting that a
    resumed run must keep; "may", a setting that may change on resume (how the run is watched, saved or
    placed, never what it trains), recorded in the run's files when it does; "ignored", how this
    invocation treats the folder (--resume, --overwrite), never compared."""
    meta = dict(help=help, low=low, high=high, above=above, choices=choices, group=group, name=name, cli=cli,
                required=required, text=text, bare=bare, on_resume=on_resume)
    return dataclasses.field(default=default, metadata={"flag": meta})


def _fields(cls: type) -> list[tuple[dataclasses.Field, dict[str, Any], Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, f.metadata["flag"], hints[f.name]) for f in dataclasses.fields(cls) if "flag" in f.metadata]


def _base_type(hint: Any) -> type:
    """int for `int | None`, and so on."""
    if typing.get_origin(hint) is tuple:
        return hint
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def flag_name(field_name: str, meta: dict[str, Any]) -> str:
    return meta["name"] or f"--{field_name}"


def describe(meta: dict[str, Any]) -> str:
    """What a flag allows, in words: 'one of a, b', '>= 1', '> 0 and <= 1'."""
    if meta["choices"]:
        return "one of " + ", ".join(meta["choices"])
    parts = []
    if meta["above"] is not None:
        parts.append(f"> {meta['above']:g}")
    if meta["low"] is not None:
        parts.append(f">= {meta['low']:g}")
    if meta["high"] is not None:
        parts.append(f"<= {meta['high']:g}")
    return " and ".join(parts) or "a finite number"


def add_flags(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One argparse argument per declared field of `cls` (in declaration order, grouped by `group`)."""
    groups: dict[str | None, Any] = {None: parser}
    for f, meta, hint in _fields(cls):
        if not meta["cli"] or f.name in skip:
            continue
        if meta["group"] not in groups:
            groups[meta["group"]] = parser.add_argument_group(meta["group"])
        add = groups[meta["group"]].add_argument
        base, help_text = _base_type(hint), meta["help"]
        if base is bool:  # `--resume` alone, or `--resume true|false` (as TRL's `--gradient_checkpointing True`)
            add(flag_name(f.name, meta), dest=f.name, nargs="?", const=not f.default, default=f.default,
                type=_switch(flag_name(f.name, meta), f.default), metavar="true|false",
                help=f"turns off: {help_text}" if f.default else help_text)
            continue
        if typing.get_origin(base) is tuple:  # several values: `--reward a --reward b`, or `--weights 1 0.1`
            item = typing.get_args(base)[0]
            many = dict(action="append") if item is str else dict(nargs="+")
            add(flag_name(f.name, meta), dest=f.name, type=_parser_type(item), default=None,
                help=f"{help_text} (default: {' '.join(map(str, f.default)) if f.default else 'none'})", **many)
            continue
        shown = "" if f.default is None or meta["required"] else f" (default: {f.default})"
        bare = dict(nargs="?", const=meta["bare"]) if meta["bare"] is not None else {}
        add(flag_name(f.name, meta), dest=f.name, type=_parser_type(base), default=f.default,
            required=meta["required"], help=help_text + shown,
            metavar=None if not meta["choices"] else "{" + ",".join(meta["choices"]) + "}", **bare)


def add_flag_of(parser: argparse.ArgumentParser, cls: type, field_name: str, help: str | None = None) -> None:  # noqa: A002
    """`--<field_name>` as `cls` declares it (type, help), default None: a front end such as train.py
    forwards it to the stage only when given, and the stage checks its range."""
    f, meta, hint = next(x for x in _fields(cls) if x[0].name == field_name)
    base = _base_type(hint)
    if base is bool:
        parser.add_argument(flag_name(f.name, meta), dest=f.name, action="store_true", help=help or meta["help"])
    else:
        parser.add_argument(flag_name(f.name, meta), dest=f.name, type=base, default=None, help=help or meta["help"])


class _Renamed(argparse.Action):
    """An old flag that still works: it sets the new one and says so in one line."""

    def __init__(self, option_strings: list[str], dest: str, new: str, value: Any, **kw: Any):
        super().__init__(option_strings, dest, nargs=0, help=argparse.SUPPRESS, **kw)
        self.new, self.value = new, value

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"note: {option_string} is now {self.new} {self.value}", flush=True)
        setattr(namespace, self.dest, self.value)


def add_renamed_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """`cls.RENAMED_FLAGS` ({"--old": ("field", value)}): old spellings kept working, hidden from --help."""
    for old, (field_name, value) in getattr(cls, "RENAMED_FLAGS", {}).items():
        f, meta, _ = next(x for x in _fields(cls) if x[0].name == field_name)
        parser.add_argument(old, dest=field_name, action=_Renamed, new=flag_name(field_name, meta), value=value)


def _parser_type(base: type) -> Any:
    """argparse's type: a value that does not parse is left as text, so `check` reports it in our
    one-line form (argparse's own error would print the usage block too)."""
    def convert(text: str) -> Any:
        try:
            return base(text)
        except ValueError:
            return _Unparsed(text)
    convert.__name__ = base.__name__
    return convert


TRUE_WORDS, FALSE_WORDS = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def _switch(name: str, default: bool) -> Any:
    """argparse's type of a switch's optional value: `true`/`false` (any case); a `--no_X` switch (a True
    default) turns its field off for true."""
    def convert(text: str) -> bool:
        word = text.strip().lower()
        if word not in TRUE_WORDS + FALSE_WORDS:
            fail(f"{name} takes true or false, or nothing (got {text!r})")
        return (word in TRUE_WORDS) != default
    convert.__name__ = "bool"
    return convert


class _Unparsed(str):
    """A flag value that is not of the flag's type."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose own errors (a missing required flag, an unknown one) are our one-line errors
    instead of a usage block."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see {self.prog} --help)")


RUN_CONFIG_KEYS = ("stage", "world_size", "start_model")  # what run_config.json adds to a config's fields


def parse_flags(cls: type, argv: list[str] | None, doc: str | None, prog: str | None = None,
                extra: Any = None) -> tuple[Any, argparse.Namespace]:
    """(checked `cls`, the parsed namespace) from `argv`; `extra(parser)` may add flags that are not
    fields of `cls` (they stay in the namespace). `--config FILE` (YAML or JSON, e.g. a run's
    run_config.json) sets fields too: the command line over the file over the defaults."""
    p = OneLineParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, metavar="FILE",
                   help="settings from a YAML or JSON file (a run's run_config.json replays it); flags given "
                        "here override it")
    add_flags(p, cls)
    add_renamed_flags(p, cls)
    if extra:
        extra(p)
    args = p.parse_args(argv)
    if args.config:
        given = _given(p, argv)
        for name, value in read_config(args.config, cls).items():
            if name not in given:
                setattr(args, name, value)
    if getattr(args, "resume", False) is True:
        resume_from_run_config(p, args, argv, cls)
    return config_from_args(cls, args), args


def _given(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The fields set on the command line itself (argparse's defaults left out)."""
    import copy

    bare = copy.deepcopy(parser)
    for action in bare._actions:
        action.default = argparse.SUPPRESS
    return set(vars(bare.parse_args(argv)))


def read_config(path: str, cls: type) -> dict[str, Any]:
    """A config file's settings for `cls`, each converted to its field's type and checked; one line naming
    the file and the key for an unreadable file, an unknown key or a bad value."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        fail(f"--config {path}: cannot read it ({exc.strerror or exc})")
    import yaml

    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        fail(f"--config {path}: not valid {'JSON' if path.endswith('.json') else 'YAML'} ({str(exc).splitlines()[0]})")
    if not isinstance(data, dict):
        fail(f"--config {path}: expected a mapping of setting names to values")
    hints = {f.name: hint for f, meta, hint in _fields(cls) if meta["cli"]}
    spelled = {f.name: (flag_name(f.name, meta), f.default) for f, meta, _ in _fields(cls) if meta["cli"]}
    try:  # our field names, the flags as --help spells them, and TRL's keys: one resolution (common/config_keys.py)
        keys = resolve_keys({k: v for k, v in data.items() if k not in RUN_CONFIG_KEYS and k != "config"}, spelled)
    except UserError as exc:
        fail(f"--config {path}: {exc}")
    if keys.unknown:
        whose = f"; it is a {data['stage']} run's config" if "stage" in data else ""
        fail(f"--config {path}: unknown key {keys.unknown[0]!r} (not a setting of {cls.__name__}, nor a TRL key "
             f"with a counterpart{whose}; see --help)")
    for note in keys.notes:
        print(f"note: {path}: {note}", flush=True)
    out = {key: _from_file(path, key, value, hints[key]) for key, value in keys.values.items()}
    try:  # ranges here, naming the file; the rules between flags wait for the command line's flags too
        _check_fields(cls(**out))
    except UserError as exc:
        fail(f"--config {path}: {exc}")
    return out


def _from_file(path: str, key: str, value: Any, hint: Any) -> Any:
    """`value` as the field's type (a YAML 1e-6 is text, a JSON list a tuple)."""
    base = _base_type(hint)
    if value is None:
        return None
    if base is bool:
        if not isinstance(value, bool):
            fail(f"--config {path}: {key} must be true or false (got {value!r})")
        return value
    if typing.get_origin(base) is tuple:
        item = typing.get_args(base)[0]
        items = value if isinstance(value, list) else [value]
        return tuple(_convert(path, key, x, item) for x in items)
    return _convert(path, key, value, base)


def _convert(path: str, key: str, value: Any, base: type) -> Any:
    if isinstance(value, (bool, dict, list)) or (base is int and isinstance(value, float) and not value.is_integer()):
        fail(f"--config {path}: {key} must be {_kind(base)} (got {value!r})")
    converted = _parser_type(base)(str(value))
    if isinstance(converted, _Unparsed):
        fail(f"--config {path}: {key} must be {_kind(base)} (got {value!r})")
    return converted


def config_from_args(cls: type, args: argparse.Namespace, **extra: Any) -> Any:
    """`cls` from the parsed flags (fields without a flag keep their defaults), checked."""
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items()
             if k in names and not (v is None and isinstance(_default(cls, k), tuple))}
    cfg = cls(**given, **extra)
    check(cfg)
    return cfg


def _default(cls: type, name: str) -> Any:
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def check(cfg: Any) -> None:
    """Stop at the first field outside its declared range or choices, naming its flag, then at the first
    broken rule between flags (`check_rules`)."""
    _check_fields(cfg)
    check_rules(cfg)


def _check_fields(cfg: Any) -> None:
    for f, meta, hint in _fields(type(cfg)):
        value = getattr(cfg, f.name)
        if value is None or _base_type(hint) is bool:
            continue
        name = flag_name(f.name, meta)
        if isinstance(value, tuple):
            for item in value:
                if isinstance(item, _Unparsed) or (isinstance(item, float) and not math.isfinite(item)):
                    fail(f"{name} must be finite numbers (got {item})")
            continue
        if isinstance(value, _Unparsed):
            fail(f"{name} must be {_kind(_base_type(hint))} {describe(meta)} (got {value})")
        if meta["choices"]:
            if value not in meta["choices"]:
                fail(f"{name} must be {describe(meta)} (got {value})")
            continue
        if meta["text"] and not re.fullmatch(meta["text"][0], str(value)):
            fail(f"{name} must be {meta['text'][1]} (got {value})")
        if isinstance(value, (int, float)) and not _in_range(value, meta):
            fail(f"{name} must be {describe(meta)} (got {value})")


def _kind(base: type) -> str:
    return {int: "a whole number", float: "a number"}.get(base, "text:")


def _in_range(value: float, meta: dict[str, Any]) -> bool:
    if isinstance(value, float) and not math.isfinite(value):
        return False
    if meta["above"] is not None and not value > meta["above"]:
        return False
    if meta["low"] is not None and value < meta["low"]:
        return False
    return meta["high"] is None or value <= meta["high"]


# --- rules between flags: declared beside the flags, in a config class's RULES, checked by `check` ---

@dataclasses.dataclass(frozen=True)
class Rule:
    """A rule between flags (or between a flag and the machine), declared in the config class's `RULES`
    beside the flags it names: `broken(cfg)` is the one-line error when the settings contradict each
    other, else None (or False). `check` applies every rule of the class and of its bases."""

    flags: tuple[str, ...]
    broken: Callable[[Any], str | None | bool]


def exclusive(a: str, b: str, why: str) -> Rule:
    """Fields `a` and `b` (switches) may not both be on; `why` says what each does."""
    return Rule((a, b), lambda cfg: getattr(cfg, a) and getattr(cfg, b) and f"--{a} and --{b} together: {why}")


def missing_device(device: str | None, name: str = "--device") -> str | None:
    """The one-line error for a CUDA device this machine does not have (`cuda` without CUDA, `cuda:3`
    with one GPU), else None. Under torchrun each process takes cuda:<local rank> instead."""
    if not device or not device.startswith("cuda"):
        return None
    import torch

    if not torch.cuda.is_available():
        return f"{name} {device}: this machine has no CUDA device (torch sees none); use {name} cpu or leave it out"
    index, count = int(device.partition(":")[2] or 0), torch.cuda.device_count()
    if index >= count:
        return (f"{name} {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}; "
                f"pick one of them")
    return None


def rules_of(cls: type) -> list[Rule]:
    """`cls`'s rules: each `RULES` of it and its bases, then a device check for every --device flag."""
    rules = [r for klass in reversed(cls.__mro__) for r in vars(klass).get("RULES", ())]
    for f, meta, _ in _fields(cls):
        if meta["text"] is DEVICE:
            rules.append(Rule((f.name,), lambda cfg, n=f.name, m=meta: missing_device(getattr(cfg, n),
                                                                                        flag_name(n, m))))
    return rules


def check_rules(cfg: Any) -> None:
    """Stop at the first broken rule between flags (`rules_of`), in one line."""
    for rule in rules_of(type(cfg)):
        message = rule.broken(cfg)
        if message:
            fail(message)


# --- --resume: a run is its run_config.json ---

def read_run_config(out: str, cls: type, flag: str) -> dict[str, Any]:
    """The settings saved in `out`/run_config.json, each as its field's type; one line when there is none
    or it is not one of `cls`'s. Not checked here: the resumed config is, once this run's flags are in."""
    path = Path(out) / RUN_CONFIG
    try:
        data = json.loads(path.read_text())
    except OSError:
        fail(f"--resume: {out} holds no run to resume (no checkpoint, no {RUN_CONFIG}); give the run's folder "
             f"with {flag}, or drop --resume to start a new run")
    except ValueError as exc:
        fail(f"--resume: {path} is not valid JSON ({exc}); it is not a run's config")
    hints = {f.name: hint for f, meta, hint in _fields(cls) if meta["cli"]}
    out_settings = {}
    for key, value in data.items():
        if key in RUN_CONFIG_KEYS:
            continue
        if key not in hints:
            fail(f"--resume: {path} has the setting {key!r}, which {cls.__name__} has not (a {data.get('stage')} "
                 f"run's config?); resume it with the trainer that wrote it")
        out_settings[key] = _from_file(str(path), key, value, hints[key])
    return out_settings


def replayable(cfg: Any) -> dict[str, Any]:
    """`cfg` as run_config.json keeps it: every field, those declared on_resume="ignored" (--resume,
    --overwrite: how this invocation treats its folder) at their defaults, so a replay never resumes or
    wipes the folder it names."""
    out = dataclasses.asdict(cfg)
    for f, meta, _ in _fields(type(cfg)):
        if meta["on_resume"] == "ignored":
            out[f.name] = f.default
    return out


def resume_from_run_config(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str] | None,
                           cls: type) -> None:
    """--resume on the command line: every setting not given (by a flag or --config) is the run's own,
    from <run folder>/run_config.json (`cls.RUN_FOLDER` names the folder's field). Settings given that
    differ from the saved ones are then refused by `resume_changes`, unless declared `on_resume="may"`."""
    folder = cls.RUN_FOLDER
    given = _given(parser, argv) | (set(read_config(args.config, cls)) if args.config else set())
    _check_given_rules(cls, args, given)
    saved = read_run_config(getattr(args, folder), cls, flag_name(folder, _meta(cls, folder)))
    ignored = {f.name for f, meta, _ in _fields(cls) if meta["on_resume"] == "ignored"}
    # where it runs is this machine's choice (the saved one is the device the first run resolved to)
    here = {f.name for f, meta, _ in _fields(cls) if meta["text"] is DEVICE}
    for name, value in saved.items():
        if name not in given and name not in ignored | here:
            setattr(args, name, value)


def _check_given_rules(cls: type, args: argparse.Namespace, given: set[str]) -> None:
    """The rules between flags that were all given (--resume with --overwrite), before the run's own
    settings are read: they contradict each other whatever the run holds."""
    names = {f.name for f in dataclasses.fields(cls)}
    as_given = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items()
                      if k in names and not (v is None and isinstance(_default(cls, k), tuple))})
    _check_fields(as_given)
    for rule in rules_of(cls):
        message = set(rule.flags) <= given and rule.broken(as_given)
        if message:
            fail(message)


def _meta(cls: type, name: str) -> dict[str, Any]:
    return next(meta for f, meta, _ in _fields(cls) if f.name == name)


def shown(cls: type, name: str, value: Any) -> str:
    """A setting as its flag on a command line: `--beta 0.04`, `--reward a --reward b`, `--use_4bit`,
    `no --use_4bit`."""
    f, meta, hint = next(x for x in _fields(cls) if x[0].name == name)
    flag = flag_name(name, meta)
    if _base_type(hint) is bool:
        return flag if value != f.default else f"no {flag}"
    if isinstance(value, (tuple, list)):
        return " ".join(f"{flag} {v}" for v in value) if value else f"no {flag}"
    return f"{flag} {value}" if value is not None else f"no {flag}"


def resume_changes(cfg: Any, saved: dict[str, Any], where: str) -> dict[str, tuple[Any, Any]]:
    """Resuming the run saved as `saved` (`read_config`'s settings of its run_config.json, at `where`)
    with `cfg`: the settings that changed and may (`on_resume="may"`), {field: (saved, now)}. Any other
    setting that differs stops here, in one line naming each with its saved value."""
    cls, refused, changed = type(cfg), [], {}
    for f, meta, _ in _fields(cls):
        if not meta["cli"] or f.name not in saved or meta["on_resume"] == "ignored":
            continue
        old, new = saved[f.name], getattr(cfg, f.name)
        new = tuple(new) if isinstance(new, list) else new
        if old == new:
            continue
        if meta["on_resume"] == "may":
            changed[f.name] = (old, new)
        else:
            refused.append(f"{shown(cls, f.name, new)} (saved: {shown(cls, f.name, old)})")
    if refused:
        folder = flag_name(cls.RUN_FOLDER, _meta(cls, cls.RUN_FOLDER))
        fail(f"--resume continues the run saved in {where} with its own settings; {', '.join(refused)} would "
             f"change it: drop {'it' if len(refused) == 1 else 'them'}, or start a new run in another {folder}")
    return changed
