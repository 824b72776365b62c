"""``meta-train`` (meta.cli / meta.train / meta.plot): outputs, exact resumption, bad arguments.

Everything runs in-process through ``meta.cli.main([...])`` with tiny settings (a few
iterations of sinusoid MAML, a handful of evaluation tasks) into temporary directories. The
Omniglot smoke run uses the real files in ``../shared/data/omniglot`` (or ``$OMNIGLOT_ROOT``)
and skips when they are absent.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

import bilevel as bl
from meta.algorithms import MAML
from meta.cli import main
from meta.train import Progress, TrainConfig, load_checkpoint, parse_estimator, train

OMNIGLOT = Path(os.environ.get("OMNIGLOT_ROOT")
                or Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def tiny(out: Path, iterations: int = 6, *extra: str) -> list[str]:
    """A few-second sinusoid MAML run in float64."""
    return ["--iterations", str(iterations), "--meta-batch", "4", "--val-every", "2",
            "--val-tasks", "4", "--test-tasks", "10", "--dtype", "float64", "--seed", "3",
            "--no-progress", "--out", str(out), *extra]


def read_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def assert_same_state(a: Path, b: Path) -> None:
    ca, cb = load_checkpoint(a / "checkpoint.pt"), load_checkpoint(b / "checkpoint.pt")
    assert ca["iteration"] == cb["iteration"]
    assert ca["model"].keys() == cb["model"].keys()
    for name in ca["model"]:
        assert ca["model"][name].dtype == torch.float64
        assert torch.equal(ca["model"][name], cb["model"][name]), name
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa[k][key], sb[k][key]), (k, key)
    train_a = [(r["iteration"], r["loss"]) for r in read_rows(a) if r["split"] == "train"]
    train_b = [(r["iteration"], r["loss"]) for r in read_rows(b) if r["split"] == "train"]
    assert train_a == train_b


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted 6-iteration run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(tiny(out, 6)) == 0
    return out


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("meta-train: error: "), err
    assert "Traceback" not in err
    return lines[0]


# ----------------------------------------------------------------------------- outputs


def test_run_writes_every_output(reference, capsys):
    out = reference
    for name in ("metrics.csv", "results.json", "curve.png", "checkpoint.pt"):
        assert (out / name).is_file(), name
    assert (out / "curve.png").read_bytes()[:8] == PNG_SIGNATURE
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # atomic writes cleaned

    rows = read_rows(out)
    assert list(rows[0]) == ["iteration", "split", "loss", "accuracy", "ci95", "time"]
    assert [int(r["iteration"]) for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [int(r["iteration"]) for r in rows if r["split"] == "val"] == [0, 2, 4, 6]
    assert [r["split"] for r in rows].count("test") == 1
    assert all(float(r["loss"]) >= 0 and r["accuracy"] == "" for r in rows)  # regression

    res = json.loads((out / "results.json").read_text())
    assert res["test"]["metric"] == "mse" and res["test"]["tasks"] == 10
    assert res["test"]["mean"] > 0 and res["test"]["ci95"] > 0
    assert res["iterations"] == 6 and res["device"] == "cpu" and res["dtype"] == "float64"
    assert res["torch_version"] == torch.__version__ and res["train_time_s"] >= 0
    assert res["args"]["algorithm"] == "maml" and res["args"]["inner_lr"] == 0.01
    assert res["args"]["hidden"] == [40, 40] and res["estimator"] == "Unrolled()"

    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["iteration"] == 6 and ckpt["config"]["meta_batch"] == 4
    assert {"torch", "numpy", "python"} <= set(ckpt["rng"])


def test_default_settings_and_summary(tmp_path, capsys):
    """No-argument defaults (Finn et al.'s sinusoid MAML), shortened; the summary on stdout."""
    out = tmp_path / "run"
    assert main(["--iterations", "2", "--test-tasks", "5", "--val-tasks", "5",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "test MSE" in printed.out and str(out) in printed.out
    assert "iter 2/2" in printed.err  # not a TTY: progress lines, not a bar
    args = json.loads((out / "results.json").read_text())["args"]
    assert (args["shots"], args["queries"], args["meta_batch"]) == (10, 10, 25)
    assert (args["inner_lr"], args["inner_steps"], args["meta_lr"]) == (0.01, 1, 1e-3)
    assert args["hidden"] == [40, 40] and args["dtype"] == "float32"
    assert args["eval_inner_steps"] == 10 and args["threads"] == 1
    assert torch.get_num_threads() >= 1  # restored after the run


# ----------------------------------------------------------------------------- resumption


def test_resume_is_bit_identical(reference, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny(out, 3)) == 0
    assert load_checkpoint(out / "checkpoint.pt")["iteration"] == 3
    assert main(tiny(out, 6, "--resume")) == 0
    assert "resuming at iteration 3" in capsys.readouterr().err
    assert_same_state(reference, out)
    res = json.loads((out / "results.json").read_text())
    assert res["segments"] == [[0, 3], [3, 6]]
    assert res["test"] == json.loads((reference / "results.json").read_text())["test"]


def test_sigint_saves_checkpoint_and_resumes_exactly(reference, tmp_path, monkeypatch, capsys):
    """Ctrl-C stops after the current iteration with a checkpoint; --resume continues."""
    calls = {"n": 0}
    original = MAML.meta_step

    def interrupted(self, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, batch)

    monkeypatch.setattr(MAML, "meta_step", interrupted)
    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)
    assert main(tiny(out, 6)) == 130
    assert signal.getsignal(signal.SIGINT) is before  # the run's handler is removed
    err = capsys.readouterr().err
    assert "interrupted at iteration 2" in err and "--resume" in err
    assert load_checkpoint(out / "checkpoint.pt")["iteration"] == 2
    assert not (out / "results.json").exists()
    monkeypatch.setattr(MAML, "meta_step", original)
    assert main(["--out", str(out), "--resume"]) == 0  # the saved arguments are reused
    assert_same_state(reference, out)


def test_resume_guards(reference, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:  # an existing run is never overwritten
        main(tiny(reference, 6))
    assert exc.value.code == 2 and "--resume" in one_error_line(capsys)
    with pytest.raises(SystemExit) as exc:  # the trajectory cannot change on resume
        main(["--out", str(reference), "--resume", "--meta-lr", "0.5"])
    assert exc.value.code == 2 and "meta-lr" in one_error_line(capsys)
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "nothing"), "--resume"])
    assert exc.value.code == 2 and "checkpoint.pt" in one_error_line(capsys)
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(reference), "--resume", "--iterations", "4"])
    assert exc.value.code == 2 and "past" in one_error_line(capsys)


# ----------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("argv, needle", [
    (["--iterations", "0"], "--iterations"),
    (["--meta-batch", "-3"], "--meta-batch"),
    (["--shots", "x"], "--shots"),
    (["--inner-lr", "0"], "--inner-lr"),
    (["--test-tasks", "0"], "--test-tasks"),
    (["--hidden", "40,0"], "--hidden"),
    (["--algorithm", "nope"], "unknown algorithm"),
    (["--estimator", "bogus"], "unknown estimator"),
    (["--estimator", "truncated:x"], "truncated"),
    (["--estimator", "truncated:5"], "more steps than the solver runs"),
    (["--algorithm", "reptile", "--estimator", "unrolled"], "estimator"),
    (["--ways", "5"], "classification datasets only"),
    (["--reg", "1.0"], "imaml"),
    (["--dataset", "mnist"], "--dataset"),
    (["--dtype", "float16"], "--dtype"),
    (["--device", "tpu9"], "device"),
    (["--dataset", "omniglot", "--shots", "10", "--queries", "15"], "20 images"),
    (["--resume"], "--out"),
    (["--bogus"], "unrecognized"),
])
def test_bad_arguments_exit_2_with_one_line(argv, needle, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out", str(out)] if "--resume" not in argv else argv)
    assert exc.value.code == 2
    assert needle in one_error_line(capsys)
    assert not out.exists()


def test_cuda_unavailable_is_a_clean_error(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(SystemExit) as exc:
        main(["--device", "cuda", "--out", str(tmp_path / "run")])
    assert exc.value.code == 2 and "CUDA is not available" in one_error_line(capsys)


def test_omniglot_missing_root_says_what_to_put_where(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "no-omniglot"
    with pytest.raises(SystemExit) as exc:
        main(["--dataset", "omniglot", "--data-root", str(missing), "--out", str(tmp_path / "r")])
    line = one_error_line(capsys)
    assert exc.value.code == 2
    assert str(missing) in line and "images_background" in line and "--download" in line
    monkeypatch.delenv("OMNIGLOT_ROOT", raising=False)
    with pytest.raises(SystemExit) as exc:
        main(["--dataset", "omniglot", "--out", str(tmp_path / "r")])
    line = one_error_line(capsys)
    assert "--data-root" in line and "OMNIGLOT_ROOT" in line and "images_evaluation" in line


def omniglot_root() -> Path:
    names = ("images_background.npz", "images_background.zip", "images_background_small1.zip")
    if not any((OMNIGLOT / n).is_file() or (OMNIGLOT / "npz" / n).is_file() for n in names):
        pytest.skip(f"no Omniglot data under {OMNIGLOT}")
    return OMNIGLOT


def test_omniglot_smoke_on_real_data(tmp_path, monkeypatch, capsys):
    root = omniglot_root()
    monkeypatch.setenv("BILEVEL_META_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["--dataset", "omniglot", "--data-root", str(root), "--iterations", "2",
                 "--hidden", "8", "--meta-batch", "2", "--val-every", "1", "--val-tasks", "2",
                 "--test-tasks", "4", "--eval-inner-steps", "2", "--no-progress",
                 "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["test"]["metric"] == "accuracy" and 0 <= res["test"]["mean"] <= 1
    assert res["args"]["ways"] == 5 and res["args"]["inner_lr"] == 0.4
    rows = read_rows(out)
    assert all(0 <= float(r["accuracy"]) <= 1 for r in rows)
    assert all(r["loss"] == "" for r in rows if r["split"] != "train")
    assert (out / "curve.png").read_bytes()[:8] == PNG_SIGNATURE
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:  # more ways than the split has classes
        main(["--dataset", "omniglot", "--data-root", str(root), "--ways", "100000",
              "--out", str(tmp_path / "r2")])
    assert exc.value.code == 2 and "exceeds" in one_error_line(capsys)


# ----------------------------------------------------------------------------- pieces


def test_estimator_specs_map_to_bilevel_objects():
    assert parse_estimator("unrolled") == bl.Unrolled()
    assert parse_estimator("truncated:3") == bl.Truncated(3)
    assert parse_estimator("checkpointed") == bl.Checkpointed()
    assert parse_estimator("implicit:cg:7") == bl.Implicit(bl.CG(iters=7))
    assert parse_estimator("firstorder") == bl.FirstOrder()
    assert parse_estimator("first-order") == bl.FirstOrder()
    assert parse_estimator("historyfree") == bl.HistoryFree()
    assert parse_estimator("historyfree:5") == bl.HistoryFree(iters=5)


def test_estimator_override_reaches_the_learner(tmp_path):
    out = tmp_path / "run"
    res = train(TrainConfig(iterations=2, meta_batch=2, val_every=0, test_tasks=4,
                            inner_steps=2, estimator="truncated:1", out=str(out),
                            progress=False), stream=io.StringIO())
    assert res["estimator"] == repr(bl.Truncated(1))
    assert [r["split"] for r in read_rows(out)] == ["train", "train", "test"]


def test_curve_without_matplotlib_warns_naming_the_plot_extra(tmp_path, capsys, monkeypatch):
    for name in [m for m in sys.modules if m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)  # (an earlier test may have imported them)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "run"
    assert main(tiny(out, 2)) == 0
    assert json.loads((out / "results.json").read_text())["curve_backend"] is None
    assert not (out / "curve.png").exists() and (out / "metrics.csv").is_file()
    captured = capsys.readouterr()
    assert "bilevel-meta[plot]" in captured.out + captured.err


def test_progress_bar_on_a_tty_and_lines_otherwise():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    bar = Progress(4, stream=tty)
    for i in range(1, 5):
        bar.update(i, 1.0 / i, 0.5)
    bar.write("val @ 4")
    bar.close()
    text = tty.getvalue()
    assert text.startswith("\r[") and "4/4" in text and "it/s" in text and "acc 0.500" in text
    assert "val @ 4\n" in text
    plain = io.StringIO()
    lines = Progress(10, every=5, stream=plain, loss_name="mse")
    for i in range(1, 11):
        lines.update(i, 1.0, float("nan"))
    out = plain.getvalue().splitlines()
    assert len(out) == 2 and out[0].startswith("iter 5/10 | mse 1.0000 |")
    assert "\r" not in plain.getvalue() and "acc" not in plain.getvalue()


def test_multi_step_learners_keep_their_own_inner_loop_on_omniglot():
    """MAML's Omniglot 0.4 x 1 is not applied to learners with multi-step inner loops (16 steps
    of 0.4 diverge for iMAML); an explicit --inner-lr still wins."""
    from meta.train import TrainConfig, resolve

    got = {a: (c.inner_lr, c.inner_steps) for a in ("maml", "imaml", "memoryreduced",
                                                    "reptile", "signmaml")
           for c in [resolve(TrainConfig(algorithm=a, dataset="omniglot"))]}
    assert got == {"maml": (0.4, 1), "imaml": (0.1, 16), "memoryreduced": (0.1, 20),
                   "reptile": (0.1, 5), "signmaml": (0.0035, 5)}
    assert resolve(TrainConfig(algorithm="imaml", dataset="sinusoid")).inner_lr == 0.01
    assert resolve(TrainConfig(algorithm="imaml", dataset="omniglot",
                               inner_lr=0.2)).inner_lr == 0.2


def test_eval_inner_lr_flag_and_retest_on_resume(tmp_path):
    """--eval-inner-lr sets the meta-test adaptation lr and may change on --resume."""
    from meta.train import TrainConfig, train

    out = tmp_path / "run"
    kw = dict(algorithm="maml", dataset="sinusoid", iterations=3, val_every=0, test_tasks=5,
              out=str(out), progress=False)
    first = train(TrainConfig(**kw, eval_inner_lr=0.02), stream=io.StringIO())
    assert first["test"]["inner_lr"] == 0.02
    again = train(TrainConfig(**{**kw, "eval_inner_lr": 0.005}), resume=True,
                  stream=io.StringIO())
    assert again["test"]["inner_lr"] == 0.005 and again["iterations"] == 3


def test_compile_flag_reaches_the_learner(monkeypatch):
    """``meta-train --compile`` builds the learner with ``compile=True`` (the compiled step
    itself is tested in tests/test_compiled.py); without the flag it stays eager."""
    from meta.train import TrainConfig as Config
    from meta.training.build import build_learner, build_model
    from meta.training.config import resolve as resolve_config

    for flag, expected in ((True, True), (None, False)):
        c = resolve_config(Config(dataset="sinusoid", algorithm="maml", compile=flag))
        learner = build_learner(c, build_model(c)[0])
        assert learner.compile is expected
