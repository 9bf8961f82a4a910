"""Faults a hostile user found (issue 29): resuming on other data, --out into someone's folder, a hand-edited
config.json, absurd counts, signals during evaluation, tied validation accuracies."""
import functools
import json
import os
import signal

import pytest

import cml
import common
import lwdgh
import maml_gs
from test_cli import TINY, Crash, interrupt_after, run


def crashed_run(tmp_path, monkeypatch, argv=TINY):
    """A run killed (kill -9) in its 2nd epoch: last.pt holds epoch 1."""
    def crash():
        raise Crash()
    interrupt_after(monkeypatch, 4, crash)
    with pytest.raises(Crash):
        run(argv + ["--out", str(tmp_path / "run")])
    monkeypatch.undo()
    return tmp_path / "run"


def test_resuming_on_other_data_is_refused_naming_both(tmp_path, monkeypatch):
    run_dir = crashed_run(tmp_path, monkeypatch)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["data"]["train"]["name"] == "synthetic/train" and config["data"]["train"]["classes"] == 64
    # other data under the same flags: fewer images per class (as the Omniglot subsets against the full set)
    monkeypatch.setattr(common, "load_split", functools.partial(common.load_split, synthetic_per_class=20))
    with pytest.raises(SystemExit, match=r"was trained on other data.*1920 images.*this command loads.*1280 images"):
        run(["--resume", str(run_dir), "--quiet"])
    monkeypatch.undo()
    assert run(["--resume", str(run_dir), "--quiet"]) == run(TINY + ["--out", str(tmp_path / "ref")])


def test_the_fingerprint_tells_splits_apart_and_is_stable():
    a = common.load_split("synthetic", "train", synthetic_shape=(1, 16, 16))
    assert common.fingerprint(a) == common.fingerprint(common.load_split("synthetic", "train",
                                                                         synthetic_shape=(1, 16, 16)))
    other = common.load_split("synthetic", "train", synthetic_shape=(1, 16, 16), seed=1)  # same counts, other pixels
    assert common.fingerprint(other)["sha1"] != common.fingerprint(a)["sha1"]


@pytest.mark.parametrize("files", [["config.json"], ["notes.txt", "metrics.csv"], ["x.tmp"]])
def test_out_into_a_folder_of_other_files_is_refused_and_leaves_them(tmp_path, files):
    folder = tmp_path / "mine"
    folder.mkdir()
    for name in files:
        (folder / name).write_text("the user's own\n")
    with pytest.raises(SystemExit, match="holds files that are not a run of this project"):
        run(TINY + ["--out", str(folder)])
    assert sorted(p.name for p in folder.iterdir()) == sorted(files)
    assert all((folder / name).read_text() == "the user's own\n" for name in files)


def test_out_into_an_empty_folder_or_a_run_killed_before_its_first_checkpoint_is_used(tmp_path):
    (tmp_path / "empty").mkdir()
    assert run(TINY + ["--out", str(tmp_path / "empty")])["status"] == "finished"
    (tmp_path / "empty" / "last.pt").unlink()  # as if killed before its first checkpoint: config.json is ours
    (tmp_path / "empty" / "result.json").unlink()
    assert run(TINY + ["--out", str(tmp_path / "empty")])["status"] == "finished"


@pytest.mark.parametrize("edit, expected", [
    ({"ways": "5"}, '"ways": "5", expected a int'), ({"epochs": None}, '"epochs": null, expected a int'),
    ({"synthetic_shape": 16}, '"synthetic_shape": 16, expected a str'),
    ({"device": "tpu"}, "\"device\": \"tpu\", expected one of 'auto', 'cpu', 'cuda'"),
    ({"gs": 1}, '"gs": 1, expected a bool'), ({"inner_lr": "0.4"}, '"inner_lr": "0.4", expected a float')])
def test_a_config_json_with_values_of_the_wrong_type_is_a_message(tmp_path, monkeypatch, edit, expected):
    run_dir = crashed_run(tmp_path, monkeypatch)
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(SystemExit, match="holds values of the wrong type") as info:
        run(["--resume", str(run_dir), "--quiet"])
    assert expected in str(info.value)


def test_an_integer_config_value_for_a_float_flag_is_accepted(tmp_path, monkeypatch):
    run_dir = crashed_run(tmp_path, monkeypatch)
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "outer_lr": 1}))  # as a hand edit writes 1.0
    with pytest.raises(SystemExit, match="belongs to a run with --outer-lr 0.001"):  # the checkpoint's own value
        run(["--resume", str(run_dir), "--quiet"])


@pytest.mark.parametrize("module, flags, bound", [
    (maml_gs, ["--filters", str(10 ** 200)], "2,147,483,647"), (maml_gs, ["--tasks", str(10 ** 400)], "2,147,483,647"),
    (maml_gs, ["--inner-steps", str(10 ** 19)], "10,000"), (lwdgh, ["--test-inner-steps", str(10 ** 19)], "10,000"),
    (maml_gs, ["--synthetic-shape", f"1,{10 ** 30},16"], "2,147,483,647")])
def test_absurd_counts_are_usage_errors_saying_the_bound(module, flags, bound, capsys):
    with pytest.raises(SystemExit) as info:
        module.main(TINY + flags)
    assert info.value.code == 2 and bound in capsys.readouterr().err


def test_the_colearner_counts_in_the_memory_estimate(capsys):
    with pytest.raises(SystemExit) as info:
        cml.main(TINY + ["--colearner-blocks", str(10 ** 9)])  # terabytes on any machine
    assert info.value.code == 2 and "need at least" in capsys.readouterr().err
    assert cml.Args(colearner_blocks=4).extra_weights() == 2 * cml.Args(colearner_blocks=2).extra_weights() > 0


@pytest.mark.parametrize("dataset", ["cifarfs", "fc100", "vggflower"])
def test_the_memory_estimate_takes_32_pixel_data_sets_as_32_pixels(dataset):
    args = common.Args(dataset=dataset)
    assert common.memory_floor(args, (3, 84, 84)) == common.memory_floor(
        common.Args(dataset="synthetic", synthetic_shape="3,32,32"), (3, 32, 32))


def test_sigterm_during_the_meta_test_stops_after_the_current_batch(tmp_path, monkeypatch):
    original, batches = common.EvalTasks.batches, []

    def batches_of(self, batch_size):
        for tasks in original(self, batch_size):
            batches.append(1)
            if len(batches) == 3 * 2 + 1:  # 3 validations of 6 tasks in batches of 3, then the meta-test's first
                os.kill(os.getpid(), signal.SIGTERM)
            yield tasks
    monkeypatch.setattr(common.EvalTasks, "batches", batches_of)
    with pytest.raises(SystemExit) as info:
        run(TINY + ["--eval-batch", "3", "--out", str(tmp_path / "run")])
    assert info.value.code == 128 + signal.SIGTERM and len(batches) == 3 * 2 + 1  # its 2nd batch never ran
    assert not (tmp_path / "run" / "result.json").exists()


def test_sigterm_during_a_validation_saves_the_epoch_and_the_resumed_run_is_the_same(tmp_path, monkeypatch):
    original, batches = common.EvalTasks.batches, []

    def batches_of(self, batch_size):
        for tasks in original(self, batch_size):
            batches.append(1)
            if len(batches) == 3:  # epoch 2's validation, the first of its 2 batches
                os.kill(os.getpid(), signal.SIGTERM)
            yield tasks
    monkeypatch.setattr(common.EvalTasks, "batches", batches_of)
    with pytest.raises(SystemExit) as info:
        run(TINY + ["--eval-batch", "3", "--out", str(tmp_path / "run")])
    assert info.value.code == 128 + signal.SIGTERM and len(batches) == 3
    monkeypatch.undo()
    reference = run(TINY + ["--eval-batch", "3", "--out", str(tmp_path / "ref")])
    assert run(["--resume", str(tmp_path / "run"), "--quiet"]) == reference


def test_a_second_signal_exits_at_once(capsys):
    with pytest.raises(SystemExit) as info, common.deferred_signals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop == [signal.SIGTERM]
        os.kill(os.getpid(), signal.SIGTERM)
    assert info.value.code == 128 + signal.SIGTERM and "second SIGTERM" in capsys.readouterr().err


def test_tied_validation_accuracies_make_the_earliest_epoch_best_in_every_field(tmp_path, monkeypatch):
    original = common.evaluate

    def evaluate(predicts, tasks, batch_size, between=lambda: None):  # every validation gives the same accuracy
        ensemble, first = original(predicts, tasks, batch_size, between)
        return (ensemble, first) if len(predicts) > 1 else (ensemble * 0 + 0.5, first)
    monkeypatch.setattr(common, "evaluate", evaluate)
    result = run(TINY + ["--out", str(tmp_path / "run")])
    assert result["max_val_epoch"] == result["ensemble_epochs"][0] == 1 and result["ensemble_epochs"] == [1, 2]


def test_no_ee_with_explore_flags_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        lwdgh.main(["--no-ee", "--p-min", "0.2", "--quiet"])
    assert info.value.code == 2 and "--no-ee never explores: --p-min would have no effect" in capsys.readouterr().err
