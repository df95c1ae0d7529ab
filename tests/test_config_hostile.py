"""A config file is read with bounds: an alias bomb, a huge or endless file, or absurd nesting gets one clear
error line and exit status 2, at once and in little memory (issue 11 item 13). Ordinary anchors, aliases and
merge keys keep working."""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from postbote.config import load_config
from postbote.errors import ConfigError
from postbote.pluginmanager import make_plugin_manager
from postbote.yaml_reader import MAX_ALIAS_USES, MAX_CONFIG_BYTES, MAX_VALUES, load_yaml

CHECK_TIME_LIMIT = 15.0  # seconds for `postbote check`, Python start included; the bomb took 20+ s unbounded
MEMORY_LIMIT_KB = 150 * 1024  # the bomb took 560+ MB unbounded

# Runs `postbote check` as its child and reports the child's peak memory: RUSAGE_CHILDREN of this process alone.
MEASURE = """
import json, resource, subprocess, sys
done = subprocess.run([sys.executable, "-m", "postbote", "-c", sys.argv[1], "check"], capture_output=True, text=True,
                      timeout=float(sys.argv[2]))
print(json.dumps({"status": done.returncode, "stdout": done.stdout, "stderr": done.stderr,
                  "max_rss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def write(tmp_path: Path, text: str | bytes, name: str = "postbote.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    os.chmod(path, 0o600)
    return path


def alias_bomb() -> str:
    """Nine levels of nine aliases each to the level below: a few hundred bytes standing for 9**9 values."""
    levels = "abcdefghi"
    lines = [f"{levels[0]}: &{levels[0]} [x, x, x, x, x, x, x, x, x]"]
    lines += [f"{name}: &{name} [{', '.join(['*' + below] * 9)}]"
              for below, name in zip(levels, levels[1:], strict=False)]
    lines.append(f"accounts: [{', '.join(['*' + levels[-1]] * 9)}]")
    return "\n".join(lines) + "\n"


def run_check(config: Path) -> dict:
    measured = subprocess.run([sys.executable, "-c", MEASURE, str(config), str(CHECK_TIME_LIMIT)],
                              capture_output=True, text=True, timeout=CHECK_TIME_LIMIT + 10,
                              cwd=Path(__file__).resolve().parent.parent)
    assert measured.returncode == 0, f"`postbote check` did not finish within {CHECK_TIME_LIMIT:g} s: " \
                                     f"{measured.stderr[-500:]}"
    return json.loads(measured.stdout)


def test_an_alias_bomb_is_refused_at_once_with_one_line_and_exit_2(tmp_path: Path) -> None:
    bomb = alias_bomb()
    assert len(bomb) < 1000
    result = run_check(write(tmp_path, bomb))
    assert result["status"] == 2
    error_lines = result["stderr"].splitlines()
    assert len(error_lines) == 1, result["stderr"]
    named = re.fullmatch(rf"postbote: error: {re.escape(str(tmp_path / 'postbote.yaml'))}:(\d+): "
                         r"too many YAML aliases .*", error_lines[0])
    assert named, error_lines[0]
    assert 1 <= int(named.group(1)) <= bomb.count("\n")
    assert result["max_rss_kb"] < MEMORY_LIMIT_KB


def test_a_bomb_of_few_aliases_to_a_large_value_is_refused_by_the_value_count(tmp_path: Path) -> None:
    big = "[" + ", ".join(["x"] * 20_000) + "]"
    path = write(tmp_path, f"a: &a {big}\nb: [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n")
    with pytest.raises(ConfigError, match=r"postbote\.yaml:1: too many YAML aliases \(they expand to more than 100000"):
        load_yaml(path)


def test_a_file_of_too_many_plain_values_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "a: [" + ", ".join(["x"] * (MAX_VALUES + 1)) + "]\n")
    with pytest.raises(ConfigError, match=r"postbote\.yaml:1: too many YAML values \(more than 100000\)$"):
        load_yaml(path)


def test_a_block_list_of_too_many_plain_values_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "a:\n" + "- x\n" * (MAX_VALUES + 1))
    with pytest.raises(ConfigError, match=r"postbote\.yaml:\d+: too many YAML values \(more than 100000\)$"):
        load_yaml(path)


def test_aliases_beyond_the_limit_are_refused_even_when_each_is_small(tmp_path: Path) -> None:
    uses = ", ".join(["*h"] * (MAX_ALIAS_USES + 1))
    path = write(tmp_path, f"host: &h pop.example.org\nhosts: [{uses}]\n")
    with pytest.raises(ConfigError, match=r"postbote\.yaml:1: too many YAML aliases"):
        load_yaml(path)


def test_a_recursive_alias_is_an_error_not_a_crash(tmp_path: Path) -> None:
    path = write(tmp_path, "a: &a [1, *a]\n")
    with pytest.raises(ConfigError, match="too many YAML aliases|nested more than"):
        load_yaml(path)


def test_a_config_file_larger_than_the_limit_is_refused_unread(tmp_path: Path) -> None:
    path = write(tmp_path, b"# " + b"x" * MAX_CONFIG_BYTES + b"\n")
    with pytest.raises(ConfigError, match="config file larger than 1024 KiB"):
        load_yaml(path)


def test_an_endless_config_file_is_refused() -> None:
    """Run in a child limited to 1 GiB of address space: reading it whole would otherwise take all memory."""
    probe = ("from pathlib import Path\nfrom postbote.yaml_reader import load_yaml\n"
             "from postbote.errors import ConfigError\n"
             "try:\n    load_yaml(Path('/dev/zero'))\nexcept ConfigError as exc:\n    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=CHECK_TIME_LIMIT,
                          cwd=Path(__file__).resolve().parent.parent, preexec_fn=limit_memory_to_1_gib)
    assert done.stdout == "/dev/zero: config file larger than 1024 KiB: not a postbote config\n", done.stderr[-500:]


def limit_memory_to_1_gib() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


@pytest.mark.parametrize("text", ["[" * 5000 + "]" * 5000, "a:\n" + "".join(" " * i + "b:\n" for i in range(1, 200))])
def test_absurd_nesting_is_one_config_error(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="nested more than 64 deep") as caught:
        load_yaml(write(tmp_path, text))
    assert len(caught.value.problems) == 1


ANCHORED = """\
x-server: &server
  host: pop.example.org
  tls: starttls
accounts:
  - name: alice
    <<: *server
    username: &user alice
    password_env: ALICE_PASSWORD
    deliver: {maildir: Mail/alice}
  - name: bob
    <<: [{tls: none, port: 110}, *server]
    host: other.example.org
    username: *user
    password_env: BOB_PASSWORD
    deliver: {maildir: Mail/bob}
"""


def test_anchors_aliases_and_merge_keys_keep_working(tmp_path: Path) -> None:
    root = load_yaml(write(tmp_path, ANCHORED))
    alice, bob = (account.value for account in root.value["accounts"].value)
    assert {key: alice[key].value for key in ("host", "tls", "username")} == {
        "host": "pop.example.org", "tls": "starttls", "username": "alice"}
    assert alice["host"].line == 2 and alice["host"].path == "accounts[0].host"
    # keys of the mapping itself win over merged ones, and earlier merged mappings over later ones
    assert {key: bob[key].value for key in ("host", "tls", "port", "username")} == {
        "host": "other.example.org", "tls": "none", "port": 110, "username": "alice"}
    assert "<<" not in alice and "<<" not in bob


def test_a_config_with_merge_keys_in_accounts_loads(tmp_path: Path) -> None:
    text = textwrap.dedent("""\
        defaults: &common
          poll_interval: 5m
        accounts:
          - name: alice
            <<: *common
            host: pop.example.org
            username: alice
            password_env: ALICE_PASSWORD
            deliver: {maildir: Mail/alice}
        """)
    config = load_config(write(tmp_path, text), make_plugin_manager(entry_points=False))
    assert config.accounts[0].poll_interval == 300


def test_merging_something_other_than_a_mapping_is_a_config_error(tmp_path: Path) -> None:
    path = write(tmp_path, "a: &a [1, 2]\nb:\n  <<: *a\n")
    with pytest.raises(ConfigError, match=r"postbote\.yaml:1: b: '<<' merges only mappings"):
        load_yaml(path)
