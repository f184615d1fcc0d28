"""README.md and the parser agree: every `onnxprune ...` command line the README shows names an existing
subcommand and only flags that subcommand has, and every `--flag` the command-line section mentions exists.

Command lines are taken from code blocks (a line starting with ``onnxprune``, with its indented
continuation lines) and from inline code spans starting with ``onnxprune``; flags in the prose of the
"Command line" section (and its subsections) must belong to some subcommand. Other sections' prose may
name flags of benchmark scripts, so only their command lines are checked.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from onnxprune.cli import SUBCOMMANDS, build_parser

README = Path(__file__).resolve().parents[1] / "README.md"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
CLI_SECTION = "## Command line"


def _subcommand_flags() -> dict[str, set[str]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if getattr(a, "choices", None) and "prune" in a.choices)
    return {
        name: {s for action in p._actions for s in action.option_strings}
        for name, p in sub.choices.items()
    }


def _sections(text: str) -> list[tuple[str, str]]:
    """(level-2 heading, body) pairs; a ### subsection belongs to its ## section."""
    parts = re.split(r"^(## .*)$", text, flags=re.M)
    return [(parts[i].strip(), parts[i + 1]) for i in range(1, len(parts) - 1, 2)]


def _command_lines(text: str) -> list[str]:
    """Command lines in code blocks (with indented continuations) and in inline code spans."""
    commands: list[str] = []
    for language, block in _code_blocks(text):
        if language not in ("", "bash", "sh", "console", "shell"):
            continue
        for line in block.splitlines():
            code = line.split("#", 1)[0].rstrip()
            if code.startswith("onnxprune"):
                commands.append(code)
            elif commands and line[:1].isspace() and code.strip().startswith("["):
                commands[-1] += " " + code.strip()  # a wrapped option list
    commands += [span for span in re.findall(r"`([^`\n]+)`", _prose(text)) if span.startswith("onnxprune ")]
    return commands


def _code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced code block, fences paired line by line."""
    blocks, language, body = [], None, []
    for line in text.splitlines():
        if line.startswith("```"):
            if language is None:
                language, body = line[3:].strip(), []
            else:
                blocks.append((language, "\n".join(body)))
                language = None
        elif language is not None:
            body.append(line)
    return blocks


def _prose(text: str) -> str:
    """`text` without its fenced code blocks."""
    out, inside = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            inside = not inside
        elif not inside:
            out.append(line)
    return "\n".join(out)


def _parse(command: str) -> tuple[str, list[str]]:
    """(subcommand, flags) of one command line; `onnxprune MODEL.onnx ...` is `prune`."""
    words = command.split()[1:]
    sub = words[0] if words and words[0] in SUBCOMMANDS else "prune"
    return sub, FLAG.findall(command)


def _readme() -> str:
    return README.read_text(encoding="utf-8")


COMMANDS = _command_lines(_readme())


def test_the_readme_shows_commands():
    assert len(COMMANDS) >= 5 and any(c.startswith("onnxprune prune") for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_command_line_matches_the_parser(command):
    flags = _subcommand_flags()
    sub, used = _parse(command)
    assert sub in flags, f"README: {command!r}: no subcommand {sub!r}"
    unknown = [f for f in used if f not in flags[sub]]
    assert not unknown, f"README: {command!r}: `onnxprune {sub}` has no {', '.join(unknown)}"


def test_flags_in_the_command_line_section_exist():
    every = set().union(*_subcommand_flags().values())
    body = next(b for h, b in _sections(_readme()) if h == CLI_SECTION)
    unknown = sorted({f for span in re.findall(r"`([^`\n]+)`", _prose(body)) for f in FLAG.findall(span)
                      if not span.startswith(("python", "pip", "bash"))} - every)  # fmt: skip
    assert not unknown, f"README's command-line section mentions flags no subcommand has: {unknown}"


def test_every_subcommand_is_documented():
    text = _readme()
    missing = [s for s in _subcommand_flags() if not re.search(rf"onnxprune {s}\b", text)]
    assert not missing, f"README shows no `onnxprune {missing[0]}` command line (undocumented: {missing})"


FASHION_RESNET = Path(__file__).resolve().parents[1] / "models" / "fashion_mnist_resnet.onnx"


def _json_bullet() -> str:
    """The README bullet that lists the `--json` keys."""
    body = next(b for h, b in _sections(_readme()) if h == CLI_SECTION)
    start = body.index("- `--json` prints one JSON object.")
    return body[start:body.index("\n- ", start + 1)]


def _json(capsys, argv: list[str]) -> dict:
    import json

    from onnxprune.cli import main

    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("mode", [[], ["--mode", "unconstrained"], ["--sparsity", "0.5", "--ratio", "0.2"]],
                         ids=["constrained", "unconstrained", "sparsity"])
def test_prune_json_is_one_contract_the_readme_lists(mode, capsys, tmp_path):
    """Every mode prints the same keys in the same order (null where empty), and the README names each."""
    from onnxprune.report import PRUNE_KEYS

    record = _json(capsys, ["prune", str(FASHION_RESNET), "-o", str(tmp_path / "p.onnx"), "--json", *mode])
    assert tuple(record) == PRUNE_KEYS
    assert record["mode"] == ("unconstrained" if "unconstrained" in mode else "constrained")
    assert record["tool"].startswith("onnxprune ") and isinstance(record["notices"], list)
    assert 0 < record["effective_params_after"] <= record["params_after"] < record["params_before"]
    if "--sparsity" in mode:  # the zeroed weights are not counted
        assert record["effective_params_after"] == record["params_after"] - record["sparsity"]["zeroed"]
    bullet = _json_bullet()
    missing = [k for k in record if f"`{k}`" not in bullet]
    assert not missing, f"README's --json bullet does not name prune's keys {missing}"


def test_analyze_json_keys_are_the_readmes(capsys):
    record = _json(capsys, ["analyze", str(FASHION_RESNET), "--json"])
    assert record["graph"] is None  # present without --graph
    missing = [k for k in record if f"`{k}`" not in _json_bullet()]
    assert not missing, f"README's --json bullet does not name analyze's keys {missing}"
