"""tools/plot_loss_curves.py reads what --loss-curve writes (training/progress.py) and compares runs."""

import json
import os
import sys

from conftest import REPO_ROOT

sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
import plot_loss_curves  # noqa: E402

from megatron_effmlm.training.progress import Progress  # noqa: E402


def _write_run(path_png, train, valid):
    p = Progress(total_iters=10, start_iter=0, enabled=True)
    for it, loss in train:
        p.history["train"].append((it, loss))
    for it, loss in valid:
        p.log_valid(it, loss)
    p.write_curve(str(path_png))
    return path_png.with_suffix(".json")


def test_round_trip_from_the_trainers_curve_files(tmp_path, capsys):
    a = _write_run(tmp_path / "a" / "loss.png", [(1, 9.0), (2, 8.0)], [(2, 8.5), (4, 7.25)])
    b = _write_run(tmp_path / "b" / "loss.png", [(1, 9.5), (2, 7.0)], [(2, 8.0), (3, 7.9), (4, 6.5)])
    assert plot_loss_curves.load_curve(str(a)) == {"train": [(1, 9.0), (2, 8.0)], "valid": [(2, 8.5), (4, 7.25)]}
    out = tmp_path / "cmp.png"
    assert plot_loss_curves.main(["--curve", f"x=1={a}", "--curve", str(b), "--hline", "7=unigram",
                                  "--output", str(out)]) == 0
    text = capsys.readouterr().out
    # only the iterations both runs evaluated, in the order given; the label may hold '='
    assert "| iteration | x=1 | loss |\n|---:|---:|---:|\n| 2 | 8.5000 | 8.0000 |\n| 4 | 7.2500 | 6.5000 |\n" in text
    assert "x=1: last validation loss 7.2500 at iteration 4 (+0.250 vs unigram)" in text
    assert "loss: last validation loss 6.5000 at iteration 4 (-0.500 vs unigram)" in text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "cmp.png"]  # no temporary file left


def test_bad_input_one_error_line_and_nothing_written(tmp_path, capsys):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"train": [[1, 2.0]], "valid": []}))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": [[1, 2.0]], "valid": "x"}))
    notjson = tmp_path / "n.json"
    notjson.write_bytes(b"\x80\x81")
    out = tmp_path / "o.png"
    cases = [
        (["--curve", str(bad)], f"error: {bad}: not a --loss-curve data file (needs 'valid' as a list of [iteration, loss])"),
        (["--curve", str(tmp_path / "none.json")], f"error: {tmp_path / 'none.json'}: no such file"),
        (["--curve", str(notjson)], f"error: {notjson}: not JSON ("),
        (["--curve", str(good), "--hline", "abc=unigram"], "error: --hline 'abc=unigram': 'abc' is not a number"),
        (["--curve", str(good), "--curve", str(good)], f"error: --curve '{good}': label 'good' given twice"),
    ]
    for argv, message in cases:
        assert plot_loss_curves.main([*argv, "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("error:") == 1, err
    assert plot_loss_curves.main(["--curve", str(good), "--output", str(tmp_path / "o.json")]) == 2
    assert capsys.readouterr().err == f"error: --output {tmp_path / 'o.json'}: give a .png file name\n"
    assert not out.exists()
