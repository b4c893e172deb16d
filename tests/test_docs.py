"""Docs are code: every repository path, config key and CLI flag the user docs name must exist.

Checked pages: README.md, docs/*.md, pallas_kernels/*/README.md, benchmarks/README.md.
- Paths: `arches/...`, `train/...`, `configs/...` etc. anywhere in a page (a `file::name` also needs `name` defined
  in the file), bare `*.py` names in an op's README (relative to its folder), and relative markdown links.
- Config keys: `model.x.y`, `data.x`, `optim.x`, `train.x`, `mesh.x` walk the dataclasses of train/config.py
  (`Config`) and arches/lm.py (`ModelConfig` and its sub-configs).
- CLI flags: on a line of an `effarch <command>` (a code block line or an inline code span) each `--flag` must be an
  option of that command's argparse parser (train/main.py, the eval tasks of train/evals/, the sweep parser); on a
  `benchmarks/<name>.py` line, an option that script declares. An inline span holding only a flag must be one of
  either.
Cheap: imports the parsers and dataclasses, compiles nothing.
"""

import argparse
import ast
import dataclasses
import functools
import re
import typing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", ROOT / "benchmarks" / "README.md", *(ROOT / "docs").glob("*.md"),
                *(ROOT / "pallas_kernels").glob("*/README.md")])
TOP_DIRS = ("arches", "layers", "pallas_kernels", "train", "configs", "tests", "benchmarks", "scripts", "docs")
TOP_FILES = ("pyproject.toml", "uv.lock", ".python-version")
# Paths of other repositories that the pages cite next to their repository's name (they are not ours).
EXTERNAL = {
    "train/configs/experiment/reference/",  # HazyResearch/based's released configs
}

# A path followed by "<" is a template (`layers/<name>.py`, `tests/layers/test_<name>.py`), not a file.
PATH_RE = re.compile(r"(?<![\w./@:~-])((?:%s)/[\w./{},-]*)(?![\w./{},<-])" % "|".join(TOP_DIRS))
SYMBOL_RE = re.compile(r"(?<![\w./@:~-])((?:%s)/[\w./-]*\.py)::(\w+)" % "|".join(TOP_DIRS))
KEY_RE = re.compile(r"(?<![\w./$-])(model|data|optim|train|mesh)((?:\.[A-Za-z_]\w*)+)(?![\w(])")
FILE_SUFFIXES = (".py", ".sh", ".md", ".yaml", ".json", ".jsonl", ".png", ".toml", ".lock", ".txt", ".safetensors")
LINK_RE = re.compile(r"\]\(([^)\s]+)\)")
FENCE_RE = re.compile(r"```[^\n]*\n(.*?)```", re.S)
SPAN_RE = re.compile(r"`([^`\n]+)`")
FLAG_RE = re.compile(r"(?<![\w-])--[a-z][\w-]*")
COMMAND_RE = re.compile(r"\beffarch (train|generate|convert|import-hf|export-hf|eval|sweep|report|plan|"
                        r"moa-search|heads)\b")
BENCH_RE = re.compile(r"benchmarks/(\w+)\.py")


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _expand(path: str) -> list[str]:
    """`a/test_{x,y}.py` -> [`a/test_x.py`, `a/test_y.py`]."""
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [q for alt in m.group(1).split(",") for q in _expand(path[: m.start()] + alt + path[m.end():])]


def _defines(path: Path, name: str) -> bool:
    return re.search(rf"^\s*(?:def|class)\s+{name}\b|^\s*{name}\s*[:=]", path.read_text(), re.M) is not None


def _missing_paths(page: Path) -> list[str]:
    text, bad = page.read_text(), []
    for raw in PATH_RE.findall(text):
        path = raw.rstrip(".,")
        if path in EXTERNAL or "..." in path:
            continue
        bad += [p for p in _expand(path) if not (ROOT / p).exists()]
    for path, name in SYMBOL_RE.findall(text):
        if (ROOT / path).is_file() and not _defines(ROOT / path, name):
            bad.append(f"{path}::{name}")
    for target in LINK_RE.findall(text):
        target = target.split("#")[0]
        if target and not re.match(r"[a-z]+:", target) and not (page.parent / target).exists():
            bad.append(f"link {target}")
    if page.parent.parent == ROOT / "pallas_kernels":  # an op's README names its files, its tests' and layers' bare
        folders = (page.parent, ROOT / "tests" / "pallas_kernels" / page.parent.name, ROOT / "layers")
        bad += [f"{page.parent.name}/{name}" for name in re.findall(r"`(\w+\.py)`", text)
                if not any((folder / name).exists() for folder in folders)]
    for name in TOP_FILES:
        if name in text and not (ROOT / name).exists():
            bad.append(name)
    return bad


def _fields(cls) -> dict[str, object]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_key(section: type, parts: list[str]) -> bool:
    cls: object = section
    for part in parts:
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            return False
        fields = _fields(cls)
        if part not in fields:
            return False
        cls = fields[part]
    return True


def _missing_keys(page: Path) -> list[str]:
    from effarch.train.config import MOVED_DATA_KEYS, Config

    sections = _fields(Config)
    bad = []
    for section, rest in KEY_RE.findall(page.read_text()):
        key = section + rest
        if key.endswith(FILE_SUFFIXES):
            continue
        if section == "data" and rest[1:] in MOVED_DATA_KEYS:  # an old flat spelling that still loads
            continue
        if not _is_key(sections[section], rest.split(".")[1:]):
            bad.append(key)
    return bad


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for s in parser._option_string_actions if s.startswith("--")}


def _cli_flags() -> dict[str, set[str]]:
    """Each `effarch` command's options, read from the parsers the commands build when asked for --help."""
    from effarch.train import evals, main

    init = argparse.ArgumentParser.__init__
    flags = {"train": set(), "report": set(), "eval": {"--help"}}
    for command in ("generate", "convert", "import-hf", "export-hf", "sweep", "plan", "moa-search", "heads"):
        built = []

        def record(self, *args, **kwargs):
            init(self, *args, **kwargs)
            built.append(self)

        with pytest.MonkeyPatch.context() as mp, pytest.raises(SystemExit):
            mp.setattr(argparse.ArgumentParser, "__init__", record)
            main.main([command, "--help"])
        assert len(built) == 1, command
        flags[command] = _options(built[0])
    for task in evals.TASKS:
        flags["eval"] |= _options(evals.parser(task))
    return flags


@functools.cache
def _bench_flags(name: str) -> frozenset[str] | None:
    path = ROOT / "benchmarks" / f"{name}.py"
    if not path.exists():
        return None
    return frozenset({"--help"}) | {
        arg.value for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument"
        for arg in node.args if isinstance(arg, ast.Constant) and str(arg.value).startswith("--")
    }


def _command_lines(text: str) -> list[str]:
    """Code block lines (a line indented under a command continues it) and inline code spans."""
    lines = []
    for block in FENCE_RE.findall(text):
        for line in block.splitlines():
            if line[:1].isspace() and lines and line.strip():
                lines[-1] += " " + line.strip()
            else:
                lines.append(line)
    outside = FENCE_RE.sub("", text)
    return lines + SPAN_RE.findall(outside)


def _wrong_flags(page: Path, cli: dict[str, set[str]]) -> list[str]:
    every = set().union(*cli.values())
    bad = []
    for line in _command_lines(page.read_text()):
        line = line.split(" # ")[0]  # a comment names other tools' options
        flags = FLAG_RE.findall(line)
        if not flags:
            continue
        command, bench = COMMAND_RE.search(line), BENCH_RE.search(line)
        if command:
            known = cli[command.group(1)]
        elif bench:
            known = _bench_flags(bench.group(1)) or set()
        elif re.fullmatch(r"--[a-z][\w-]*( [\w.]+)*", line.strip()):  # a bare flag in the prose
            known = every | set().union(*(_bench_flags(p.stem) or set() for p in (ROOT / "benchmarks").glob("*.py")))
        else:
            continue  # another program's line (pip, uv, pytest, bash scripts/...)
        bad += [f"{flag} in {line.strip()!r}" for flag in flags if flag not in known]
    return bad


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_named_paths_exist(page):
    assert not _missing_paths(page), f"{_page_id(page)} names paths that do not exist"


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_named_config_keys_exist(page):
    assert not _missing_keys(page), f"{_page_id(page)} names config keys that do not exist"


@pytest.fixture(scope="module")
def cli_flags():
    return _cli_flags()


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_named_cli_flags_exist(page, cli_flags):
    assert not _wrong_flags(page, cli_flags), f"{_page_id(page)} names options its commands do not have"


def test_the_checks_catch_what_they_should(cli_flags, tmp_path):
    """Each check fails on a made-up name, so a check that silently matched nothing would show here."""
    page = ROOT / "docs" / "_probe.md"  # never written: the checks read it through a patched read_text
    missing = "train/" + "no_such_file.py"  # assembled, so no scan of the repository reads it as a real reference
    probe = (f"`{missing}`, `layers/axes.py::NoSuchProtocol`, [x](no_such_page.md), "
             "`model.based.no_such_field`, `train.no_such_key`, `model.d_model.deeper`\n"
             "```bash\n.venv/bin/effarch generate RUN --no-such-flag\n.venv/bin/effarch sweep S.yaml --jobs 2\n"
             "    [--dry-run | --collectt]\n.venv/bin/python benchmarks/mqar_loop.py --repeatz 3\n```\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Path, "read_text", lambda self, *a, **k: probe if self == page else _read(self, *a, **k))
        assert len(_missing_paths(page)) == 3
        assert sorted(_missing_keys(page)) == ["model.based.no_such_field", "model.d_model.deeper",
                                               "train.no_such_key"]
        wrong = _wrong_flags(page, cli_flags)
        assert [w.split()[0] for w in wrong] == ["--no-such-flag", "--collectt", "--repeatz"], wrong


_read = Path.read_text
