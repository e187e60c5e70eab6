"""Every public name carries a docstring, every runnable example in the core modules runs, and the
README and docs/ hold only code that runs, commands that parse and links that resolve."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import globalpool as gp
from globalpool.lab.cli import app

try:  # typer >= 0.2x runs on its own copy of click, older typer on click itself
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover
    from click.exceptions import UsageError

MODULES = [
    "globalpool",
    "globalpool._entry",
    "globalpool.adaptive",
    "globalpool.compat.timm",
    "globalpool.compat.sentence_transformers",
    "globalpool.compose",
    "globalpool.contract",
    "globalpool.dispatch",
    "globalpool.embedding",
    "globalpool.embedding.head",
    "globalpool.embedding.multiscale",
    "globalpool.embedding.whitening",
    "globalpool.functional",
    "globalpool.kernels",
    "globalpool.kernels.cpu_numba",
    "globalpool.kernels.ops",
    "globalpool.kernels.launch",
    "globalpool.warmup",
    "globalpool.heads",
    "globalpool.registry",
    "globalpool.reference_defs",
    "globalpool.segments",
    "globalpool.layers",
    "globalpool.monitor",
    "globalpool.cam.attention",
    "globalpool.packed",
    "globalpool.reference",
    "globalpool.lab.bench.report",
    "globalpool.lab.data.folder_archive",
    "globalpool.lab.data.folder_cache",
    "globalpool.lab.data.folder_layout",
]


@pytest.mark.parametrize("name", MODULES)
def test_doctests_pass(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"


@pytest.mark.parametrize("name", [n for n in gp.__all__ if n not in ("KINDS", "HEADS", "LEARNED_POOLS")])
def test_public_names_have_examples(name):
    doc = getattr(gp, name).__doc__ or ""
    assert ">>>" in doc, f"globalpool.{name} needs a docstring with a runnable example"


# --------------------------------------------------------------------------------------------
# README.md and docs/**/*.md

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOC_FILES = [README, *sorted((ROOT / "docs").rglob("*.md"))]

PYTHON_LANGS = ("python", "py", "python3")
SHELL_LANGS = ("bash", "sh", "shell", "console")
# a fenced block: an opening fence (possibly indented, in a list), its info string, the body, the
# closing fence at the same indent
FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.S | re.M
)
# optional packages a block may need; only these make a block skip when they are not installed
OPTIONAL_MODULES = ("onnx", "onnxruntime", "onnxscript", "triton", "keras", "sentence_transformers")


def code_blocks(text: str) -> list[tuple[str, str, int]]:
    """``(info string, body, line of the opening fence)`` of every fenced block in ``text``."""
    blocks = []
    for m in FENCE.finditer(text):
        indent = m.group("indent")
        lines = m.group("body").splitlines(keepends=True)
        body = "".join(ln[len(indent) :] if ln.startswith(indent) else ln for ln in lines)
        blocks.append((m.group("info").strip(), body, text.count("\n", 0, m.start()) + 1))
    return blocks


def _lang(info: str) -> str:
    return info.split()[0].lower() if info.split() else ""


def _skipped(info: str) -> bool:
    """A block is skipped only when its info string says so: ```python skip ..."""
    return "skip" in info.split()[1:]


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _blocks(langs: tuple[str, ...]) -> list:
    params = []
    for path in DOC_FILES:
        for info, body, line in code_blocks(path.read_text()):
            if _lang(info) in langs:
                marks = [pytest.mark.skip(reason=f"marked: {info}")] if _skipped(info) else []
                params.append(
                    pytest.param(path, body, line, id=f"{_rel(path)}:{line}", marks=marks)
                )
    return params


def run_python_block(body: str, name: str) -> None:
    """Run one block as a script of its own (a fresh namespace); any exception propagates."""
    exec(compile(body, name, "exec"), {"__name__": "__main__"})


PYTHON_BLOCKS = _blocks(PYTHON_LANGS)
SHELL_BLOCKS = _blocks(SHELL_LANGS)


@pytest.mark.parametrize(("path", "body", "line"), PYTHON_BLOCKS)
def test_doc_python_blocks_run(path, body, line, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever a block writes lands here
    try:
        run_python_block(body, f"{_rel(path)}:{line}")
    except ModuleNotFoundError as exc:
        if exc.name in OPTIONAL_MODULES and importlib.util.find_spec(exc.name) is None:
            pytest.skip(f"optional package {exc.name} is not installed")
        raise


def test_every_python_fence_is_collected():
    """Guards the collection itself: a fence the pattern missed would silently never run."""
    for path in DOC_FILES:
        text = path.read_text()
        opened = len(re.findall(r"^[ \t]*```(?:python|py|python3)\b", text, flags=re.M))
        found = sum(_lang(info) in PYTHON_LANGS for info, _, _ in code_blocks(text))
        assert opened == found, f"{_rel(path)}: {opened} python fences, {found} collected"
    readme_blocks = [p for p in PYTHON_BLOCKS if p.values[0] == README]
    assert len(readme_blocks) >= 6, "the README's examples are no longer collected"


def test_a_failing_block_fails():
    text = "intro\n\n```python\nx = 1\n```\n\n- item\n\n  ```python\n  assert x == 2\n  ```\n"
    blocks = code_blocks(text)
    assert [(info, body) for info, body, _ in blocks] == [
        ("python", "x = 1\n"),
        ("python", "assert x == 2\n"),
    ]
    run_python_block(blocks[0][1], "ok")
    with pytest.raises(NameError):  # a fresh namespace per block: x is not defined
        run_python_block(blocks[1][1], "fails")
    with pytest.raises(AssertionError):
        run_python_block("x = 1\n" + blocks[1][1], "fails")
    assert _skipped("python skip needs torchrun") and not _skipped("python")


# --------------------------------------------------------------------------------------------
# shell blocks: every globalpool command parses


def globalpool_invocations(body: str) -> list[list[str]]:
    """The arguments after ``globalpool`` (or ``-m globalpool``) of every command in a shell
    block; ``&&``, ``;`` and ``|`` separate commands, ``#`` starts a comment."""
    found = []
    for line in body.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line.removeprefix("$ "), posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words, command = list(lexer), []
        for word in [*words, ";"]:
            if word and set(word) <= set("&;|"):
                if command:
                    args = _globalpool_args(command)
                    if args is not None:
                        found.append(args)
                command = []
            else:
                command.append(word)
    return found


def _globalpool_args(words: list[str]) -> list[str] | None:
    if words[0] == "globalpool":
        return words[1:]
    if "-m" in words:
        module = words[words.index("-m") + 1]
        if module.startswith("globalpool"):
            assert module == "globalpool", f"{module} has no command line; use -m globalpool"
            return words[words.index("-m") + 2 :]
    return None


def check_cli_args(args: list[str]) -> None:
    """Parse ``globalpool ARGS`` as the CLI would (option names, value types and ranges) without
    running the command; raises ``UsageError`` where it would refuse them."""
    group = typer.main.get_command(app)
    root = typer.Context(group, info_name="globalpool")
    if not args:
        raise UsageError("no subcommand", root)
    command = group.get_command(root, args[0])
    if command is None:
        raise UsageError(f"no such command {args[0]!r}", root)
    with command.make_context(args[0], list(args[1:]), parent=root):
        pass


@pytest.mark.parametrize(("path", "body", "line"), SHELL_BLOCKS)
def test_doc_globalpool_commands_parse(path, body, line):
    for args in globalpool_invocations(body):
        try:
            check_cli_args(args)
        except UsageError as exc:
            pytest.fail(f"{_rel(path)}:{line}: `globalpool {shlex.join(args)}`: {exc}")


def test_a_bad_command_fails_to_parse():
    assert globalpool_invocations(
        "pip install -e . && globalpool compare  # run\n"
        "torchrun --nproc_per_node=2 -m globalpool compare --heads avg\n"
        "globalpool warmup --kind gem --dtype float32,bfloat16; echo done\n"
    ) == [
        ["compare"],
        ["compare", "--heads", "avg"],
        ["warmup", "--kind", "gem", "--dtype", "float32,bfloat16"],
    ]
    check_cli_args(["bench", "--quick", "--kinds", "avg,gem"])
    for bad in (
        ["compare", "--no-such-option"],
        ["no-such-command"],
        ["bench", "--repeats", "0"],
        ["compare", "--seeds", "three"],
        [],
    ):
        with pytest.raises(UsageError):
            check_cli_args(bad)


def test_ci_runs_the_readme_test_command():
    """The Quickstart's test command is the one CI runs, word for word."""
    ci = ROOT / ".ci" / "run"
    if not ci.exists():
        pytest.skip("no .ci/run in this checkout")
    quickstart = README.read_text().partition("## Quickstart")[2].partition("\n## ")[0]
    commands = [body.strip() for info, body, _ in code_blocks(quickstart) if _lang(info) == "bash"]
    assert len(commands) == 2, "Quickstart: one command to run compare, one to run the tests"
    assert commands[1] in ci.read_text().splitlines()


def _commands() -> list[str]:
    return sorted(typer.main.get_command(app).commands)


def test_readme_shows_every_command():
    shown = {
        args[0]
        for info, body, _ in code_blocks(README.read_text())
        if _lang(info) in SHELL_LANGS
        for args in globalpool_invocations(body)
        if args
    }
    assert set(_commands()) <= shown, f"README shows no example of {set(_commands()) - shown}"


@pytest.mark.parametrize("command", _commands())
def test_command_help(command):
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


# --------------------------------------------------------------------------------------------
# links

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)


def _prose(text: str) -> str:
    """``text`` without its fenced blocks and inline code (links there are not links)."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def links(text: str) -> list[str]:
    prose = _prose(text)
    return LINK.findall(prose) + REFERENCE.findall(prose)


def anchors(text: str) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file (duplicates get -1, -2, ...)."""
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", FENCE.sub("", text), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """Relative links of ``path`` whose file (or heading) does not exist under ``root``."""
    broken = []
    for target in links(path.read_text()):
        if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        file_part, _, fragment = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif root != dest and root not in dest.parents:
            broken.append(f"{target} (outside the repository)")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest.read_text()):
            broken.append(
                f"{target} (no heading #{fragment} in {dest.relative_to(root).as_posix()})"
            )
    return broken


@pytest.mark.parametrize("path", DOC_FILES, ids=_rel)
def test_doc_links_resolve(path):
    assert broken_links(path) == []


def test_a_broken_link_is_found(tmp_path):
    (tmp_path / "there.md").write_text("# A heading, with `code`\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](there.md) [ok](there.md#a-heading-with-code) [web](https://example.com)\n"
        "![missing](img/none.png) [bad anchor](there.md#nope) [self](#nowhere)\n"
        "`[not a link](gone.md)`\n\n```bash\n[also not](gone.md)\n```\n"
    )
    assert broken_links(page, root=tmp_path) == [
        "img/none.png (no such file)",
        "there.md#nope (no heading #nope in there.md)",
        "#nowhere (no heading #nowhere in page.md)",
    ]
