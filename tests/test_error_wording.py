"""Core errors speak Python, the CLI speaks flags: a message names the setting that fixes it as a
placeholder, the core fills in the Python spelling, and the CLI rewords it (cli/wording.py)."""

import ast
import re
import string
from pathlib import Path

import pytest
from click.testing import CliRunner

import influence_store
import influence_store.cli.commands  # noqa: F401  (attaches the built-in commands)
from influence_store.cli.main import cli
from influence_store.cli.wording import FLAGS
from influence_store.curation import propose, review
from influence_store.errors import InfluenceStoreError
from influence_store.store import Store

PACKAGE = Path(influence_store.__file__).parent
CORE_SOURCES = sorted(p for p in [*PACKAGE.glob("*.py"), *(PACKAGE.parent / "plugins").glob("*.py")]
                      if p.name != "__init__.py")
FLAG = re.compile(r"(?<![\w-])--?[a-z][\w-]*\b")
COMMAND = re.compile(r"influence-store (init|run|runs|db|versions|proposals|review|export|propose|scores)\b")


def python_error(call) -> str:
    with pytest.raises(InfluenceStoreError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def cli_error(*args) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_a_store_path_that_is_a_folder_is_told_in_the_readers_words(tmp_path):
    folder = tmp_path / "{odd} folder"  # braces in a fact stay text, never a placeholder
    folder.mkdir()
    message = python_error(lambda: Store(str(folder)))
    assert message == f"store path {str(folder)!r} is a directory; give a file path as the store location"
    assert cli_error("--db", folder, "init") == (f"Error: store path {str(folder)!r} is a directory; "
                                                 f"give a file path with --db")


def test_a_missing_proposal_points_to_the_listing_of_each_reader(tmp_path):
    db = tmp_path / "store.db"
    message = python_error(lambda: review(Store(str(db)), "accept", [999]))
    assert message == "no proposal 999; see store.proposals()"
    listing = "Error: no proposal 999; see `influence-store proposals list`"
    assert cli_error("--db", db, "review", "accept", 999) == listing


def test_a_setting_with_a_bad_value_is_named_as_the_reader_would_pass_it(tmp_path):
    store = Store(str(tmp_path / "store.db"))
    assert python_error(lambda: propose(store, 1, top=0)) == "top must be at least 1, got 0"
    flag = cli_error("--db", tmp_path / "store.db", "propose", 1, "--top", 0)
    assert flag == "Error: --top must be at least 1, got 0"


def test_a_missing_store_is_created_by_store_in_python_and_by_init_on_the_cli(tmp_path):
    db = tmp_path / "store.db"
    message = python_error(lambda: Store(str(db), create=False))
    assert f"create one with Store({str(db)!r}) or give its path as the store location" in message
    assert "`influence-store init` or give its path with --db" in cli_error("--db", db, "runs", "show", 1)


def messages(path: Path):
    """(line, message text, keyword names, whether the text is a template) of every ``InfluenceStoreError(...)``
    in a source file."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "InfluenceStoreError" and node.args:
            strings = [n for n in ast.walk(node.args[0]) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
            parts = [n.value for n in strings]
            yield node.lineno, "".join(parts), {k.arg for k in node.keywords}, isinstance(node.args[0], ast.Constant)


@pytest.mark.parametrize("path", CORE_SOURCES, ids=lambda p: p.name)
def test_core_messages_name_no_flag_and_fill_every_placeholder(path):
    """Outside the CLI no message spells a flag or a shell command (pip's own flags aside), and a template
    names only settings and facts it is given."""
    for line, text, keywords, plain in messages(path):
        if "pip install" not in text:
            assert not FLAG.search(text), f"{path.name}:{line}: {text!r} names a flag; use a placeholder"
        assert not COMMAND.search(text), f"{path.name}:{line}: {text!r} names a command; use a placeholder"
        if keywords and plain:
            named = {field for _, field, _, _ in string.Formatter().parse(text) if field}
            assert named <= keywords, f"{path.name}:{line}: {sorted(named - keywords)} not given"


def test_every_cli_spelling_fills_from_the_facts_its_message_gives():
    """Each template in FLAGS formats with the facts the core passes beside that setting."""
    for path in CORE_SOURCES:
        for line, _, keywords, _ in messages(path):
            for name in keywords & set(FLAGS):
                needed = {field for _, field, _, _ in string.Formatter().parse(FLAGS[name]) if field}
                assert needed <= keywords, f"{path.name}:{line}: FLAGS[{name!r}] needs {sorted(needed - keywords)}"
