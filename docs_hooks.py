"""MkDocs hooks for the tunelab docs site (mkdocs.yml: `hooks: [docs_hooks.py]`).

Two jobs, both at build time so the site cannot drift from the code:
- the configuration reference (`docs/reference/configuration.md`) is generated from the
  pydantic models in tunelab/config.py, and the CLI reference (`docs/reference/cli.md`) from
  the Typer app in tunelab/cli.py. Both are committed (readable without building the site);
  `python docs_hooks.py` (run by `make docs`) rewrites them, and the build warns, so the strict
  build in `make test` fails, when a committed one differs from what the code generates;
- pages reserved for work landing on other branches are dropped from the nav while their
  file is absent, so every branch builds in strict mode on its own. Any other nav entry
  without a file still fails the strict build.
"""

from __future__ import annotations

import json
import logging
import types
import typing
from pathlib import Path
from typing import Any

import typer.core
from pydantic import BaseModel

log = logging.getLogger("mkdocs.hooks.tunelab")

# Pages other branches write (see /work/coord/docs-conventions.md); listed in mkdocs.yml's nav.
RESERVED_PAGES = (
    "preference.md",
    "grpo.md",
    "generation.md",
    "serving.md",
    "export.md",
    "ui.md",
    "hpo.md",
    "evaluation.md",
)
CONFIG_REFERENCE = "reference/configuration.md"
CLI_REFERENCE = "reference/cli.md"


# ---------------------------------------------------------------- configuration reference


def type_text(annotation: Any) -> str:
    """A field's type as a reader writes it: `int`, `str or null`, `bool or str` (Literals by their values' type)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:  # the values themselves are in the "allowed" column
        return " or ".join(dict.fromkeys(type(a).__name__ for a in args))
    if origin in (typing.Union, types.UnionType):  # "or", not "|": a pipe would end the table cell
        return " or ".join(dict.fromkeys(type_text(a) for a in args))
    if origin in (list, tuple):
        inner = ", ".join(type_text(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"section ({annotation.__name__})"
    return getattr(annotation, "__name__", str(annotation))


def allowed_values(annotation: Any) -> list[Any]:
    """Every value a field accepts when that is a closed set (Literals, bools, null; a list's items);
    empty when any part is open (`list[str] or "all-linear"`: any module name goes)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return list(typing.get_args(annotation))
    if annotation is bool:
        return [True, False]
    if annotation is type(None):
        return [None]
    if origin is list:
        return allowed_values(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        parts = [allowed_values(arg) for arg in typing.get_args(annotation)]
        return [v for part in parts for v in part] if all(parts) else []
    return []


def bounds_text(field) -> str:
    """`>= 1`, `> 0, <= 1.0` from the field's annotated-types constraints."""
    parts = []
    for item in field.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            value = getattr(item, attr, None)
            if value is not None:
                parts.append(f"{sign} {value}")
    return ", ".join(parts)


def default_text(field) -> str:
    if field.is_required():
        return "(required)"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(section)"
    from pydantic_core import to_jsonable_python  # lists of sub-models (grpo.rewards) as plain JSON

    return "`" + json.dumps(to_jsonable_python(value)) + "`"


def cell(text: str) -> str:
    """Markdown table cell: pipes escaped, newlines flattened."""
    return text.replace("|", "\\|").replace("\n", " ")


def section_table(model: type[BaseModel], prefix: str) -> list[str]:
    rows = ["| key | type | default | allowed | description |", "|---|---|---|---|---|"]
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            continue  # a section: it gets its own heading below
        allowed = allowed_values(annotation)
        allowed_cell = ", ".join(f"`{json.dumps(v)}`" for v in allowed) or bounds_text(field)
        rows.append(
            f"| `{prefix}{name}` | {cell('`' + type_text(annotation) + '`')} | {cell(default_text(field))} | "
            f"{cell(allowed_cell)} | {cell(field.description or '')} |"
        )
    return rows


def configuration_reference() -> str:
    """Every key of RunConfig: one table for the top level, one per section."""
    from tunelab.config import FOREIGN_KEYS, RunConfig

    lines = [
        "# Configuration reference",
        "",
        "Generated from the pydantic models in `tunelab/config.py` (`make docs` rewrites this file; the",
        "docs test fails when it is out of date), so it lists exactly the keys the code accepts. Every key can be set in the YAML/JSON file or on",
        "the command line as `section.key=value`; see [Configuration](../configuration.md) for how",
        "files, overrides and error messages work.",
        "",
        "## Top level {#run}",
        "",
        *section_table(RunConfig, ""),
        "",
    ]
    for name, field in RunConfig.model_fields.items():
        model = field.annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        lines += [f"## `{name}` {{#{name}}}", ""]
        if model.__doc__ and "Base for every config group" not in model.__doc__:
            lines += [" ".join(model.__doc__.split()), ""]
        lines += [*section_table(model, f"{name}."), ""]
        for sub_name, sub_field in model.model_fields.items():
            sub_model = typing.get_args(sub_field.annotation) or (sub_field.annotation,)
            for candidate in sub_model:
                if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                    lines += [f"### `{name}.{sub_name}` {{#{name}-{sub_name}}}", ""]
                    if candidate.__doc__:
                        lines += [" ".join(candidate.__doc__.split()), ""]
                    lines += [*section_table(candidate, f"{name}.{sub_name}."), ""]
    lines += [
        "## Keys from other libraries {#foreign-keys}",
        "",
        "A key copied from a transformers, peft or bitsandbytes config is an error that names",
        "tunelab's key, wherever in the file it was put (`FOREIGN_KEYS` in `tunelab/config.py`):",
        "",
        "| their key | tunelab |",
        "|---|---|",
        *[f"| `{key}` | {cell(value)} |" for key, value in FOREIGN_KEYS.items()],
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI reference


def param_row(param: typer.core.TyperOption | typer.core.TyperArgument) -> str:
    """One table row: the option's spellings (or the argument's name), type, default and help."""
    kind = type_text(param.type_descriptor.annotation)
    if isinstance(param, typer.core.TyperOption):
        names = ", ".join(f"`{n}`" for n in [*param.opts, *param.secondary_opts])
        if param.is_flag:
            kind = "flag"
        shown = param.default not in (None, False, "", (), []) and param.show_default
        default = f"`{param.default}`" if shown and not param.is_flag else ""
        return f"| {names} | {cell(kind)} | {cell(default)} | {cell(param.help or '')} |"
    name = param.name.upper()
    many = " ..." if param.nargs == -1 or param.multiple else ""
    required = "required" if param.required else "optional"
    return f"| `{name}{many}` (argument, {required}) | {cell(kind)} | | {cell(param.help or '')} |"


def command_section(command: typer.core.TyperCommand | typer.core.TyperGroup, path: list[str], lines: list[str]) -> None:
    if command.hidden:
        return
    title = " ".join(path)
    anchor = "-".join(path[1:]) or "tunelab"
    lines += [f"## `{title}` {{#{anchor}}}", ""]
    if command.help:
        lines += [" ".join(command.help.split()), ""]
    params = [p for p in command.params if p.name != "help"]
    if params:
        lines += ["| argument / option | type | default | help |", "|---|---|---|---|"]
        lines += [param_row(p) for p in params]
        lines += [""]
    if isinstance(command, typer.core.TyperGroup):
        for name in sorted(command.commands):
            command_section(command.commands[name], [*path, name], lines)


def cli_reference() -> str:
    """Every visible command and option of the Typer app."""
    import typer

    from tunelab.cli import app

    group = typer.main.get_command(app)
    lines = [
        "# CLI reference",
        "",
        "Generated from the Typer app in `tunelab/cli.py` (`make docs` rewrites this file; the docs",
        "test fails when it is out of date). Every command also prints this with `--help`. Errors you can fix exit with code 2 and one message.",
        "",
    ]
    for name in sorted(group.commands):
        command_section(group.commands[name], ["tunelab", name], lines)
    return "\n".join(lines)


# ---------------------------------------------------------------- hooks


def _drop_absent_reserved(nav: list, docs_dir: Path) -> list:
    kept = []
    for item in nav:
        if isinstance(item, dict):
            (title, value), = item.items()
            if isinstance(value, list):
                value = _drop_absent_reserved(value, docs_dir)
                if value:
                    kept.append({title: value})
                continue
            if value in RESERVED_PAGES and not (docs_dir / value).is_file():
                log.info("nav: %s is reserved for another branch and not here yet; left out", value)
                continue
        kept.append(item)
    return kept


def on_config(config, **kwargs):
    config["nav"] = _drop_absent_reserved(config["nav"], Path(config["docs_dir"]))
    return config


def on_files(files, config, **kwargs):
    """The committed references must equal what the code generates now (strict: a warning fails)."""
    docs_dir = Path(config["docs_dir"])
    for name, text in generated_pages().items():
        path = docs_dir / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            log.warning("%s is out of date with the code it documents: run `make docs` (it rewrites the file)", path)
    return files


def generated_pages() -> dict[str, str]:
    return {CONFIG_REFERENCE: configuration_reference(), CLI_REFERENCE: cli_reference()}


def write_generated_pages(docs_dir: Path) -> None:
    for name, text in generated_pages().items():
        path = docs_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")


if __name__ == "__main__":  # `make docs`: refresh the generated references before building
    write_generated_pages(Path(__file__).resolve().parent / "docs")
