"""Tests of the ``cebmf`` command line's bad-input paths (``cebmf fit`` and ``cebmf demo``).

A user error ends the command with ``SystemExit(message)``: Python prints the one-line
message to stderr and exits with status 1. The fits are tiny; where an error must come
before any work, the work itself is replaced by a function that fails the test.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import cebmf
import cebmf.datasets
from cebmf.cli import main
from cebmf.demo import run_demo


def _tiny_h5ad(path):
    rng = np.random.default_rng(0)
    counts = rng.poisson(2.0, size=(30, 12)).astype(np.float32)
    obs = pd.DataFrame({"mito": rng.random(30)}, index=[f"c{i}" for i in range(30)])
    ad.AnnData(counts, obs=obs).write_h5ad(path)
    return path


def _user_error(argv) -> str:
    """The message of the one-line error that ``cebmf argv`` ends with (exit status 1)."""
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert isinstance(err.value.code, str), "a str exit code is printed and exits with 1"
    assert "\n" not in err.value.code
    return err.value.code


@pytest.fixture
def no_work(monkeypatch):
    """Fitting, or loading the demo's data, fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the command did work before refusing its arguments")

    monkeypatch.setattr(cebmf.tl, "fit", refuse)
    monkeypatch.setattr(cebmf.datasets, "pbmc68k_counts", refuse)


def test_fit_refuses_an_output_it_cannot_create_before_fitting(tmp_path, no_work):
    src = _tiny_h5ad(tmp_path / "in.h5ad")
    # the folder of the output would be under a file: used to end, after the whole fit,
    # in a NotADirectoryError traceback
    message = _user_error(["fit", str(src), str(src / "sub" / "out.h5ad"), "-q"])
    assert message == (
        f"cebmf fit: error: cannot create output {src / 'sub' / 'out.h5ad'}: {src} is a "
        "file, not a folder; choose an output path in a folder."
    )
    folder = tmp_path / "folder.h5ad"
    folder.mkdir()
    message = _user_error(["fit", str(src), str(folder), "-q"])
    assert message.startswith(f"cebmf fit: error: output {folder} is a folder; give the path")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.h5ad", "in.h5ad"]
    assert not any(folder.iterdir())


def test_fit_write_error_is_one_line(tmp_path, monkeypatch):
    src = _tiny_h5ad(tmp_path / "in.h5ad")
    dest = tmp_path / "new" / "out.h5ad"

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", disk_full)
    argv = ["fit", str(src), str(dest), "-q", "--n-factors", "1", "--max-iter", "2"]
    assert _user_error(argv) == (
        f"cebmf fit: error: cannot write {dest} (OSError: [Errno 28] No space left on device)."
    )


def test_fit_errors_have_the_documented_prefix(tmp_path, no_work):
    src = _tiny_h5ad(tmp_path / "in.h5ad")
    missing = tmp_path / "missing.h5ad"
    assert _user_error(["fit", str(missing), str(tmp_path / "o.h5ad")]) == (
        f"cebmf fit: error: input file {missing} does not exist."
    )
    assert _user_error(["fit", str(src), str(tmp_path / "out.csv")]) == (
        f"cebmf fit: error: output {tmp_path / 'out.csv'} must end in .h5ad (the input "
        "in.h5ad is an AnnData file)."
    )
    mu = tmp_path / "in.h5mu"  # checked before the file is read
    mu.write_bytes(b"")
    message = _user_error(["fit", str(mu), str(tmp_path / "o.h5mu"), "--var-covariates", "gc"])
    assert message.startswith("cebmf fit: error: --var-covariates 'gc': an .h5mu's feature")


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--n-factors", "0"], "cebmf demo: error: --n-factors must be an integer >= 1, got 0."),
        (["--max-iter", "0"], "cebmf demo: error: --max-iter must be an integer >= 1, got 0."),
    ],
)
def test_demo_refuses_bad_counts_before_any_work(tmp_path, no_work, capsys, options, expected):
    out = tmp_path / "demo"
    assert _user_error(["demo", "--out", str(out), *options]) == expected
    assert not out.exists()  # not even the folder
    assert capsys.readouterr().out == ""


def test_demo_refuses_an_out_that_is_not_a_folder(tmp_path, no_work, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    assert _user_error(["demo", "--out", str(afile)]) == (
        f"cebmf demo: error: --out={str(afile)!r} is an existing file, not a folder; pass "
        "a folder (it is created if missing)."
    )
    message = _user_error(["demo", "--out", str(afile / "sub")])
    assert message.startswith(f"cebmf demo: error: --out={str(afile / 'sub')!r} cannot be")
    assert afile.read_text() == "keep me"
    assert capsys.readouterr().out == ""


def test_run_demo_refuses_bad_arguments_naming_them(tmp_path, no_work):
    out = tmp_path / "demo"
    with pytest.raises(ValueError, match=r"^n_factors must be an integer >= 1, got 0\.$"):
        run_demo(out, n_factors=0)
    with pytest.raises(ValueError, match=r"^max_iter must be an integer >= 1, got 2\.5\.$"):
        run_demo(out, max_iter=2.5)
    with pytest.raises(TypeError, match=r"^progress must be True or False, got 'no'\.$"):
        run_demo(out, progress="no")
    assert not out.exists()
    afile = tmp_path / "afile"
    afile.touch()
    with pytest.raises(ValueError, match=r"^out='.*afile' is an existing file, not a folder"):
        run_demo(afile)
