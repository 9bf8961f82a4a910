"""What a run tells a log file (issue 30): its start line, plain progress lines under a pipe, the data variant."""
import json
import re
import subprocess
import sys

import pytest

import common
import maml_gs
from test_cli import REPO, TINY

LOUD = [a for a in TINY if a != "--quiet"]


def test_under_a_pipe_progress_comes_as_plain_lines_at_the_set_pace(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common.Progress, "PLAIN_EVERY_S", 0.0)
    monkeypatch.setattr(common.Progress, "PLAIN_EVERY_ITERS", 2)  # TINY: 3 epochs x 3 meta-iterations
    maml_gs.main(LOUD + ["--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if re.match(r"epoch \d/3 iter \d/3: ", line)]
    assert len(lines) == 9 // 2 and "\r" not in err and "\x1b" not in err
    assert all(re.fullmatch(r"epoch \d/3 iter \d/3: loss \d+\.\d{4} acc \d+\.\d\d%, \d+\.\d\d it/s, ETA \d+\.\d min",
                            line) for line in lines), lines


def test_no_plain_line_comes_before_the_pace(tmp_path, capsys):
    maml_gs.main(LOUD + ["--out", str(tmp_path / "run")])  # defaults: 50 meta-iterations and 60 s
    assert not re.search(r"^epoch \d/3 iter", capsys.readouterr().err, re.M)


def test_a_run_announces_where_it_writes_on_what_and_from_which_data(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "maml_gs.py"), *LOUD, "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, cwd=REPO)
    first = out.stderr.splitlines()[0]
    assert first.startswith(f"run {tmp_path / 'run'}: maml_gs.py on cpu (") and "data synthetic from generated" in first
    assert "(64/16/20 train/val/test classes); 3-way 1-shot, 2 queries, 2 tasks per meta-iteration, 3 epochs x 3 " \
        "meta-iterations" in first


def test_the_omniglot_variant_is_recorded_named_and_warned_about(tmp_path, shared_data, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default run directory goes under ./runs
    argv = ["--dataset", "omniglot", "--data-root", str(shared_data), "--cache-dir", str(tmp_path / "cache"),
            "--filters", "4", "--tasks", "1", "--inner-steps", "1", "--epochs", "1", "--iters-per-epoch", "1",
            "--val-tasks", "2", "--test-tasks", "2", "--quiet"]
    for out in ([], ["--out", str(tmp_path / "again")]):  # the warning every time, also once the cache exists
        result = maml_gs.main(argv + out)
        assert "warning: no full Omniglot under --data-root" in capsys.readouterr().err
    assert result["data_variant"] == "omniglot-small"
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("maml_gs__omniglot-small__5w1s__t1__1__")
    assert json.loads((run_dir / "config.json").read_text())["data_variant"] == "omniglot-small"


def test_every_shared_flag_is_in_one_help_group():
    grouped = [name for names in common.HELP_GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(f.name for f in common.dataclasses.fields(common.Args))


@pytest.mark.parametrize("program", ["maml_gs", "cml", "lwdgh"])
def test_help_lists_the_methods_flags_first_then_the_groups_each_default_once_and_examples(program, capsys):
    module = __import__(program)
    with pytest.raises(SystemExit):
        module.main(["--help"])
    text = capsys.readouterr().out
    titles = [f"{program}.py's own flags:", *(f"{title}:" for title in common.HELP_GROUPS), "examples:"]
    assert [text.index(f"\n{title}\n") for title in titles] == sorted(text.index(f"\n{t}\n") for t in titles)
    own = text[text.index(titles[0]):text.index(titles[1])]
    assert "--inner-steps" in own and "--ways" not in own
    flags = re.split(r"\n  --", text[text.index(titles[0]):])
    assert all(flag.count("default") <= 1 for flag in flags), [f for f in flags if f.count("default") > 1]
    assert f"python {program}.py --resume" in text


def test_a_missing_miniimagenet_names_the_files_of_every_split(tmp_path):
    with pytest.raises(common.DataError) as info:
        common.load_split("miniimagenet", "train", tmp_path)
    assert all(f"mini-imagenet-cache-{split}.pkl" in str(info.value) for split in ("train", "val", "test"))
