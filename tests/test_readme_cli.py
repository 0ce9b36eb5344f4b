"""The README and ``--help`` agree: every option the README gives a command exists in that
command's parser, every parser option is described in the README, and every ``--help`` ends
with examples that parse.

The README is read as its sections: a section whose heading is ``wsi-anomaly COMMAND …``
documents COMMAND (its ``####`` sub-sections included); examples are lines that run
``wsi-anomaly COMMAND …`` anywhere, in code blocks or inline code. Failures name the command,
the option and the README line, so that an option added to one side is easy to add to the other.
"""

from __future__ import annotations

import argparse
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from wsi_anomaly.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
#: Options every command has, described once in the README's "Commands" section.
COMMON = {"--help", "--verbose", "--quiet", "--debug"}
#: The command of an option named outside the commands' own sections: it must be some command's.
ANY = "any command"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("the parser has no subcommands")


PARSER = build_parser()
COMMANDS = _subparsers(PARSER)


def parser_options(command: str) -> set[str]:
    """The long options of ``command`` a user is meant to see (hidden ones left out)."""
    return {
        flag
        for action in COMMANDS[command]._actions
        if action.help != argparse.SUPPRESS
        for flag in action.option_strings
        if flag.startswith("--")
    } - COMMON


def known_options(command: str) -> set[str]:
    """Every option ``command`` parses, the verbosity options included."""
    return set(COMMANDS[command]._option_string_actions)


@dataclass
class Mention:
    command: str
    option: str
    line: int
    where: str  # "example", "table" or "text"


@dataclass
class Readme:
    mentions: list[Mention] = field(default_factory=list)
    #: command → the README lines of its own sections (text, tables, code)
    sections: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    #: the text of each section that documents no command of its own (cluster, re-runs…)
    general: list[str] = field(default_factory=list)


def _example_commands(text: str) -> list[tuple[str, str]]:
    """(command, argument text) of each ``wsi-anomaly COMMAND …`` run in ``text``: global
    options before COMMAND skipped; a run ends at a comment, a pipe, ``&&`` or ``;``."""
    runs = []
    for match in re.finditer(r"(?<![\w/.-])wsi-anomaly((?:\s+-{1,2}[a-z-]+)*)\s+([a-z]+)", text):
        command = match.group(2)
        if command not in COMMANDS:
            continue
        rest = text[match.end() :]
        rest = re.split(r"\s#|\s\||&&|;|`", rest, maxsplit=1)[0]
        runs.append((command, rest))
    return runs


def _options_in_arguments(arguments: str) -> list[str]:
    try:
        tokens = shlex.split(arguments)
    except ValueError:
        tokens = arguments.split()
    return [t.split("=", 1)[0] for t in tokens if t.startswith("--")]


def read_readme(path: Path = README) -> Readme:
    readme = Readme()
    lines = path.read_text(encoding="utf-8").splitlines()
    command_of_section: list[str] = []  # the commands of the current ### section
    in_code = False
    script = False
    continued = ""  # a code line ending in a backslash, waiting for its continuation
    for number, line in enumerate(lines, start=1):
        heading = re.match(r"^(#+) (.*)", line) if not in_code else None
        if heading:
            level = len(heading.group(1))
            if level <= 3:
                command_of_section = re.findall(r"`wsi-anomaly ([a-z][a-z-]*)", heading.group(2))
                # a section about a script (`python benchmarks/x.py …`) documents its options
                script = "`python " in heading.group(2)
                readme.general.append("")
            continue
        for command in command_of_section:
            readme.sections.setdefault(command, []).append((number, line))
        if not command_of_section and readme.general:
            readme.general[-1] += line + "\n"
        if line.startswith("```"):
            in_code = not in_code
            continue
        if in_code:
            text = continued + line.lstrip("$ ")
            if text.rstrip().endswith("\\"):
                continued = text.rstrip()[:-1] + " "
                continue
            continued = ""
            for command, arguments in _example_commands(text):
                for option in _options_in_arguments(arguments):
                    readme.mentions.append(Mention(command, option, number, "example"))
            continue
        spans = re.findall(r"`([^`]+)`", line)
        for span in spans:
            for command, arguments in _example_commands(span):
                for option in _options_in_arguments(arguments):
                    readme.mentions.append(Mention(command, option, number, "example"))
        if line.startswith("| `--") and re.search(r"\| *`[a-z]+`(, `[a-z]+`)* *\|$", line):
            # the table of flags several commands share: its last cell names the commands
            cells = line.strip("|").split("|")
            for command in re.findall(r"`([a-z]+)`", cells[-1]):
                for option in OPTION.findall(cells[0]):
                    readme.mentions.append(Mention(command, option, number, "table"))
            continue
        if len(command_of_section) != 1:
            if not command_of_section and not script and not line.startswith("|"):
                for span in spans:  # an option outside the commands' sections
                    if span.startswith("--"):
                        for option in OPTION.findall(span.split("=")[0]):
                            readme.mentions.append(Mention(ANY, option, number, "text"))
            continue
        (command,) = command_of_section
        if line.startswith("|"):
            cells = line.strip("|").split("|")
            first = cells[0] if cells else ""
            for span in re.findall(r"`([^`]+)`", first):
                if span.startswith("--"):
                    for option in OPTION.findall(span):
                        readme.mentions.append(Mention(command, option, number, "table"))
            continue
        for span in spans:  # inline options in a command's own text: `--flag VALUE`
            if span.startswith("--"):
                for option in OPTION.findall(span.split("=")[0]):
                    readme.mentions.append(Mention(command, option, number, "text"))
    return readme


README_TEXT = read_readme()


def test_options_outside_the_command_sections_exist():
    """An option in the general sections (re-runs, cluster, API…) is some command's option;
    another program's flag is written with its program (`sbatch --test-only`)."""
    every = set().union(*(known_options(c) for c in COMMANDS))
    unknown = [
        f"README.md:{m.line}: `{m.option}` is not an option of any command"
        for m in README_TEXT.mentions
        if m.command == ANY and m.option not in every
    ]
    assert not unknown, "\n".join(unknown)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_the_readme_names_exists(command):
    known = known_options(command)
    unknown = [
        f"README.md:{m.line}: {m.where} gives `wsi-anomaly {command} {m.option}`, "
        f"which `wsi-anomaly {command} --help` does not have"
        for m in README_TEXT.mentions
        if m.command == command and m.option not in known
    ]
    assert not unknown, "\n".join(unknown)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_is_in_the_readme(command):
    """Each option appears in the command's own section(s), in one of its examples, or in the
    table of flags shared by several commands (a row naming the command)."""
    assert command in README_TEXT.sections, f"the README has no `wsi-anomaly {command}` section"
    text = "\n".join(line for _, line in README_TEXT.sections[command])
    described = set(OPTION.findall(text))
    for other in README_TEXT.general:  # a general section with an example of the command
        if any(command == c for c, _ in _example_commands(other)):
            described |= set(OPTION.findall(other))
    described |= {m.option for m in README_TEXT.mentions if m.command == command}
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.startswith("| `--") and f"`{command}`" in line.split("|")[-2]:
            described |= set(OPTION.findall(line.split("|")[1]))
    missing = sorted(parser_options(command) - described)
    assert not missing, "\n".join(
        f"`wsi-anomaly {command} {option}` is not in the README's {command} section"
        for option in missing
    )


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_ends_with_examples_that_parse(command):
    text = COMMANDS[command].format_help().rstrip()
    assert "examples:" in text, f"`wsi-anomaly {command} --help` has no examples"
    tail = text.rsplit("examples:", 1)[1]
    runs = [ln.strip() for ln in tail.splitlines() if ln.strip().startswith("wsi-anomaly ")]
    assert 1 <= len(runs) <= 3, tail
    assert all(
        ln.strip() == "" or ln.strip().startswith(("wsi-anomaly ", "#")) for ln in tail.splitlines()
    ), tail
    for run in runs:
        argv = shlex.split(run.split("  #")[0])[1:]
        assert argv[0] == command, run
        PARSER.parse_args(argv)  # exits (fails the test) on an unknown option


def test_the_checks_catch_a_wrong_readme(tmp_path):
    """A README that gives heatmap an option it lacks, in an example, a table and the text, is
    reported three times, by line."""
    fake = tmp_path / "README.md"
    fake.write_text(
        "### `wsi-anomaly heatmap SLIDE`\n\n```bash\nwsi-anomaly heatmap s.svs --model m.pt \\\n"
        "    --stride 128\n```\n\n| option | meaning |\n|---|---|\n| `--max-px 2048` | size |\n\n"
        "Use `--no-such-flag` to do nothing; `--mpp 0.5` exists.\n"
    )
    found = {(m.option, m.line, m.where) for m in read_readme(fake).mentions}
    assert ("--stride", 5, "example") in found
    assert ("--max-px", 10, "table") in found
    assert ("--no-such-flag", 12, "text") in found
    assert not {m for m in found if m[0] == "--stride" and m[2] != "example"}
    known = known_options("heatmap")
    assert {o for o, _, _ in found} - known == {"--stride", "--max-px", "--no-such-flag"}
