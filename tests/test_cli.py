"""The argument types every command shares (gan_tune/cli.py); each command's flags run through its real CLI in
test_bad_input.py and test_bad_input_tools.py."""

import argparse

import pytest

from gan_tune import cli


def test_an_output_folder_is_tried_and_nothing_stays_behind(tmp_path):
    target = tmp_path / "made" / "later"
    assert cli.out_folder(str(target)) == str(target)
    assert list(tmp_path.iterdir()) == []  # the probe file and the folders made for it are gone


def test_an_output_file_is_tried_and_an_existing_one_is_left_as_it_was(tmp_path):
    json_file = cli.out_file(".json")
    assert json_file(str(tmp_path / "new" / "a.json")) == str(tmp_path / "new" / "a.json")
    assert list(tmp_path.iterdir()) == []
    existing = tmp_path / "a.json"
    existing.write_text("kept")
    json_file(str(existing))
    assert list(tmp_path.iterdir()) == [existing] and existing.read_text() == "kept"


@pytest.mark.parametrize("check, text", [(cli.out_folder, "/proc/gan_tune_out"),
                                         (cli.out_file(".json"), "/proc/gan_tune.json"),
                                         (cli.out_file(".json"), "/proc/gan_tune/deeper/a.json")])
def test_a_path_where_no_file_can_be_made_is_refused(check, text):
    """os.access says yes to root under /proc; making a file there fails (and leaves nothing)."""
    with pytest.raises(argparse.ArgumentTypeError, match="cannot write there"):
        check(text)


@pytest.mark.parametrize("check", [cli.out_folder, cli.out_file(".png")])
def test_a_path_under_a_file_names_the_file(tmp_path, check):
    (tmp_path / "plain").write_text("a file\n")
    with pytest.raises(argparse.ArgumentTypeError, match=f"{tmp_path / 'plain'} is a file, not a folder"):
        check(str(tmp_path / "plain" / "deeper" / "g.png"))
    assert (tmp_path / "plain").read_text() == "a file\n"


def test_a_data_folder_may_be_read_only_once_it_exists(tmp_path):
    """classifier --data-dir: a cache filled before may sit on a read-only mount (/proc stands for one: nothing can
    be made there, even by root); a folder still to be made must be makeable."""
    assert cli.data_folder("/proc") == "/proc"
    with pytest.raises(argparse.ArgumentTypeError, match="cannot write"):
        cli.out_folder("/proc")
    with pytest.raises(argparse.ArgumentTypeError, match="cannot write"):
        cli.data_folder("/proc/gan_tune_data")
    (tmp_path / "plain").write_text("x")
    with pytest.raises(argparse.ArgumentTypeError, match="is a file"):
        cli.data_folder(str(tmp_path / "plain"))
