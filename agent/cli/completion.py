"""Shell completion for bash, zsh and fish, written from the argument parser (`postbote.cli.build_parser`) so that
every command and option it knows is completed, and nothing it does not: commands, their options, the choices of an
option that has them, file names after an option that takes a file. Written by `postbote.cli.manpage`."""

from __future__ import annotations

import argparse
import re
import shlex

from postbote.cli.manpage import options_of, subcommands

FILE_METAVARS = {"FILE", "DIR"}


def takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0


def wants_file(action: argparse.Action) -> bool:
    return str(action.metavar) in FILE_METAVARS


def plain(text: str | None) -> str:
    """Help text fit for a completion menu: one line, no quotes or brackets that the shells read specially."""
    return re.sub(r"[\[\]'\"`:\\$]", "", " ".join((text or "").split()))[:90]


# --- bash


def bash_script(parser: argparse.ArgumentParser) -> str:
    commands = subcommands(parser)
    global_options = options_of(parser)
    valued = sorted({name for _, _, sub in commands for action in options_of(sub) if takes_value(action)
                     for name in action.option_strings} | {name for action in global_options if takes_value(action)
                                                            for name in action.option_strings})
    lines = ["# bash completion for postbote (generated from its argument parser; do not edit)",
             "_postbote() {",
             '    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}" command="" i',
             "    for ((i = 1; i < COMP_CWORD; i++)); do",
             '        case "${COMP_WORDS[i]}" in',
             f"            {'|'.join(valued)}) ((i++)) ;;",
             "            -*) ;;",
             '            *) command="${COMP_WORDS[i]}"; break ;;',
             "        esac",
             "    done",
             '    case "$prev" in']
    value_cases: dict[str, str] = {}
    for action in [*global_options, *(a for _, _, sub in commands for a in options_of(sub))]:
        if not takes_value(action):
            continue
        pattern = "|".join(action.option_strings)
        if action.choices:
            value_cases[pattern] = f'COMPREPLY=($(compgen -W {shlex.quote(" ".join(map(str, action.choices)))} ' \
                                   '-- "$cur")); return ;;'
        elif wants_file(action):
            value_cases[pattern] = 'COMPREPLY=($(compgen -f -- "$cur")); return ;;'
        else:
            value_cases[pattern] = "return ;;"
    lines += [f"        {pattern}) {reply}" for pattern, reply in value_cases.items()]
    lines += ["    esac",
              '    case "$command" in',
              f'        "") COMPREPLY=($(compgen -W {shlex.quote(words([n for n, _, _ in commands], global_options))} '
              '-- "$cur")) ;;']
    for name, _, sub in commands:
        choices = shlex.quote(words([], options_of(sub)))
        lines.append(f'        {name}) COMPREPLY=($(compgen -W {choices} -- "$cur")) ;;')
    lines += ["    esac", "}", "complete -o default -F _postbote postbote", ""]
    return "\n".join(lines)


def words(names: list[str], options: list[argparse.Action]) -> str:
    return " ".join([*names, *(name for action in options for name in action.option_strings)])


# --- zsh


def zsh_spec(action: argparse.Action) -> str:
    names = action.option_strings
    exclusive = f"({' '.join(names)})" if len(names) > 1 else ""
    flags = "{" + ",".join(names) + "}" if len(names) > 1 else names[0]
    text = f"[{plain(action.help)}]"
    if not takes_value(action):
        return f"'{exclusive}'{flags}'{text}'"
    if action.choices:
        value = f":{plain(str(action.metavar or action.dest))}:({' '.join(map(str, action.choices))})"
    elif wants_file(action):
        value = f":{plain(str(action.metavar))}:_files"
    else:
        value = f":{plain(str(action.metavar or action.dest))}: "
    return f"'{exclusive}'{flags}'{text}{value}'"


def zsh_script(parser: argparse.ArgumentParser) -> str:
    commands = subcommands(parser)
    lines = ["#compdef postbote", "# zsh completion for postbote (generated from its argument parser; do not edit)",
             "_postbote() {", "    local -a commands", "    local state line", "    commands=("]
    lines += [f"        '{name}:{plain(summary)}'" for name, summary, _ in commands]
    lines += ["    )", "    _arguments -C \\"]
    lines += [f"        {zsh_spec(action)} \\" for action in options_of(parser)]
    lines += ["        '1: :->command' \\", "        '*:: :->arguments'",
              '    case "$state" in',
              "        command) _describe 'command' commands ;;",
              "        arguments)",
              '            case "$line[1]" in']
    for name, _, sub in commands:
        specs = " ".join(zsh_spec(action) for action in options_of(sub))
        lines.append(f"                {name}) _arguments {specs} '*: :_default' ;;")
    lines += ["            esac ;;", "    esac", "}", '_postbote "$@"', ""]
    return "\n".join(lines)


# --- fish


def fish_line(action: argparse.Action, condition: str) -> str:
    parts = ["complete -c postbote", f"-n {shlex.quote(condition)}"]
    for name in action.option_strings:
        parts.append(f"-l {name[2:]}" if name.startswith("--") else f"-s {name[1:]}")
    if takes_value(action):
        if action.choices:
            parts.append(f"-x -a {shlex.quote(' '.join(map(str, action.choices)))}")
        elif wants_file(action):
            parts.append("-r -F")
        else:
            parts.append("-x")
    parts.append(f"-d {shlex.quote(plain(action.help))}")
    return " ".join(parts)


def fish_script(parser: argparse.ArgumentParser) -> str:
    commands = subcommands(parser)
    lines = ["# fish completion for postbote (generated from its argument parser; do not edit)",
             "complete -c postbote -f"]
    lines += [fish_line(action, "true") for action in options_of(parser)]
    for name, summary, sub in commands:
        lines.append(f"complete -c postbote -n __fish_use_subcommand -a {name} -d {shlex.quote(plain(summary))}")
        lines += [fish_line(action, f"__fish_seen_subcommand_from {name}") for action in options_of(sub)
                  if action not in options_of(parser)]
    return "\n".join([*lines, ""])
