"""``postbote manual --output DIR``: the manual pages ``postbote(1)`` and ``postbote.yaml(5)`` and the shell
completions, written from what they describe so they cannot drift: the command's page from the argument parser
(every command, option, exit status and example), the configuration's page from the annotated example config
(``examples/postbote.yaml``, which the tests keep a valid config documenting every key). No dependency: roff is
simple enough to write.

It writes ``DIR/man/man1/postbote.1``, ``DIR/man/man5/postbote.yaml.5`` and the completions
(`postbote.cli.completion`): ``DIR/bash-completion/completions/postbote``, ``DIR/zsh/site-functions/_postbote``,
``DIR/fish/vendor_completions.d/postbote.fish`` -- the layout of ``/usr/share``, ``/usr/local/share`` or
``~/.local/share``. The parser comes from the top of the CLI (``args.build_parser``), which no command imports.
"""

from __future__ import annotations

import argparse
import datetime
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from postbote import __version__


def shipped_example() -> Path:
    """The annotated example config, ``examples/postbote.yaml``, which the package links to and installs beside
    its code (a wheel holds the file itself), so that the pages can be made wherever postbote is installed."""
    return Path(__file__).parent.parent / "example.yaml"


_KEY_LINE = re.compile(r"^(?P<indent>\s*)(?:#\s*)?(?:- )?(?P<key>[a-z][a-z0-9_]*):(?P<value>[^#]*?)\s*"
                       r"(?:#\s*(?P<comment>.*))?$")


def roff(text: str) -> str:
    """``text`` safe in a roff line: backslashes doubled, hyphens as minus signs in options, no control character
    at a line start."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    text = "".join(char if char.isascii() else f"\\[u{ord(char):04X}]" for char in text)
    return "\n".join(f"\\&{line}" if line.startswith((".", "'")) else line for line in text.split("\n"))


def bold(text: str) -> str:
    return f"\\fB{roff(text)}\\fR"


def option_names(action: argparse.Action) -> str:
    names = ", ".join(bold(name) for name in action.option_strings)
    if action.nargs == 0:
        return names
    return f"{names} \\fI{roff(str(action.metavar or action.dest.upper()))}\\fR"


def options_of(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [action for action in parser._actions
            if action.option_strings and action.help is not argparse.SUPPRESS and "-h" not in action.option_strings]


def positionals_of(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [action for action in parser._actions
            if not action.option_strings and not isinstance(action, argparse._SubParsersAction)]


def subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, one-line summary, parser) of every command, in the parser's order."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            summaries = {choice.dest: choice.help or "" for choice in action._choices_actions}
            return [(name, summaries.get(name, ""), sub) for name, sub in action.choices.items()]
    return []


def epilog_fields(parser: argparse.ArgumentParser) -> dict[str, str]:
    """``exit status:`` and ``example:`` from a command's epilog (see `postbote.cli._command`)."""
    fields: dict[str, str] = {}
    for line in (parser.epilog or "").splitlines():
        name, colon, value = line.partition(": ")
        if colon:
            fields[name] = value
    return fields


def command_page(parser: argparse.ArgumentParser, date: str) -> str:
    lines = [f'.TH POSTBOTE 1 "{date}" "postbote {__version__}" "User Commands"',
             ".SH NAME",
             "postbote \\- " + roff("fetch mail from POP3 and IMAP and redeliver it, never losing a message"),
             ".SH SYNOPSIS", f"{bold('postbote')} [\\fIOPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]",
             ".SH DESCRIPTION", roff(parser.description or ""),
             ".SH OPTIONS", "These options go before the command or after it."]
    for action in options_of(parser):
        lines += [".TP", option_names(action), roff(action.help or "")]
    lines.append(".SH COMMANDS")
    for name, summary, sub in subcommands(parser):
        lines += [".SS " + roff(name), ".nf", roff(" ".join(sub.format_usage().split()[1:])), ".fi", ".PP",
                  roff(sub.description or summary)]
        for action in positionals_of(sub):
            lines += [".TP", f"\\fI{roff(str(action.metavar or action.dest))}\\fR", roff(action.help or "")]
        for action in options_of(sub):
            if action.default is argparse.SUPPRESS and action.option_strings[0] in ("-c", "--log-level",
                                                                                    "--log-format", "-q", "-v"):
                continue  # the common options, described once above
            lines += [".TP", option_names(action), roff(action.help or "")]
        fields = epilog_fields(sub)
        if "exit status" in fields:
            lines += [".PP", f"Exit status: {roff(fields['exit status'])}"]
        if "example" in fields:
            lines += [".PP", "Example:", ".PP", ".RS", ".nf", roff(fields["example"]), ".fi", ".RE"]
    lines += [".SH EXIT STATUS",
              roff("0: everything listed was taken care of; 1: a message was deferred or rejected, an account "
                   "failed, or mail waits (status); 2: a usage or configuration error. Each command above says "
                   "more."),
              ".SH FILES", ".TP", bold("$POSTBOTE_CONFIG"), ".TQ", bold("./postbote.yaml"), ".TQ",
              bold("~/.config/postbote/postbote.yaml"), ".TQ", bold("/etc/postbote/postbote.yaml"),
              roff("the configuration, looked for in this order without -c; see postbote.yaml(5)."),
              ".SH SEE ALSO", "\\fBpostbote.yaml\\fR(5)", ""]
    return "\n".join(lines)


@dataclass(frozen=True)
class Key:
    """One key of the example config: where it sits (the keys above it), its example value and its comment."""

    path: tuple[str, ...]
    value: str
    comment: str


def example_keys(text: str) -> Iterator[Key]:
    """The keys of the annotated example, commented-out ones included (they document optional keys), each with
    its comment: the comment block right above it, the comment on its line and the continuation lines below it
    (indented comments)."""
    stack: list[tuple[int, str]] = []
    keys: list[list[str]] = []  # [path..., value, comment]
    pending: list[str] = []  # a comment block waiting for the key below it
    after_key = False
    for line in text.splitlines():
        match = _KEY_LINE.match(line)
        if match is None:
            comment = re.match(r"^\s*#\s?(.*)$", line)
            if comment and after_key and re.match(r"^(\s{20,}#|\s*#\s{2,})", line):
                keys[-1][-1] = f"{keys[-1][-1]} {comment.group(1).strip()}".strip()
                continue
            after_key = False
            pending = [*pending, comment.group(1).strip()] if comment else []
            continue
        indent = len(match["indent"]) + (2 if "- " in line[:len(match["indent"]) + 4] else 0)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match["key"]))
        text = " ".join([*pending, (match["comment"] or "").strip()]).strip()
        keys.append([*(key for _, key in stack), match["value"].strip(), text])
        pending, after_key = [], True
    for entry in keys:
        yield Key(tuple(entry[:-2]), entry[-2], entry[-1])


def config_page(example: str, date: str) -> str:
    header = [line[2:] for line in example.split("\n\n", 1)[0].splitlines() if line.startswith("# ")]
    lines = [f'.TH POSTBOTE.YAML 5 "{date}" "postbote {__version__}" "File Formats"',
             ".SH NAME", "postbote.yaml \\- " + roff("postbote's configuration"),
             ".SH DESCRIPTION", roff(" ".join(header)),
             roff("Every mistake is reported as FILE:LINE: key: what was expected, all at once, and postbote check "
                  "validates a file without polling."),
             ".SH KEYS",
             roff("Each key with an example value and what it does, in the order of the example below; an "
                  "account's keys may also go under defaults:.")]
    seen: set[tuple[str, ...]] = set()
    for key in example_keys(example):
        if key.path in seen:
            continue
        seen.add(key.path)
        value = f" {roff(key.value)}" if key.value and key.value != "|" else ""
        lines += [".TP", f"{bold('.'.join(key.path))}{value}", roff(key.comment) if key.comment else ""]
    lines += [".SH EXAMPLE", ".nf", roff(example.rstrip("\n")), ".fi",
              ".SH SEE ALSO", "\\fBpostbote\\fR(1)", ""]
    return "\n".join(lines)


def write_all(parser: argparse.ArgumentParser, output: Path, example: Path, date: str | None = None) -> list[Path]:
    """Write the two pages and the three completion scripts under ``output``; returns the files written."""
    from postbote.cli.completion import bash_script, fish_script, zsh_script

    date = date or datetime.date.today().isoformat()
    files = {
        output / "man" / "man1" / "postbote.1": command_page(parser, date),
        output / "man" / "man5" / "postbote.yaml.5": config_page(example.read_text(encoding="utf-8"), date),
        output / "bash-completion" / "completions" / "postbote": bash_script(parser),
        output / "zsh" / "site-functions" / "_postbote": zsh_script(parser),
        output / "fish" / "vendor_completions.d" / "postbote.fish": fish_script(parser),
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return list(files)


def run(args: argparse.Namespace) -> int:
    from postbote.errors import ConfigError

    example = Path(args.example) if args.example else shipped_example()
    if not example.is_file():
        raise ConfigError(f"{example}: no such file; name the annotated example config with --example")
    for path in write_all(args.build_parser(), Path(args.output), example):
        print(path)
    return 0
