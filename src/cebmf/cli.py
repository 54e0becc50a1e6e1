"""The ``cebmf`` command line: ``cebmf fit`` and ``cebmf demo``."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from pathlib import Path

logger = logging.getLogger("cebmf")


def _names(value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    return names or None


def _by_modality(names: list[str] | None) -> dict[str, list[str]] | None:
    """``["rna:log_mean", "atac:gc"]`` -> ``{"rna": ["log_mean"], "atac": ["gc"]}``: the
    feature covariates of a MuData belong to one modality each."""
    if names is None:
        return None
    out: dict[str, list[str]] = {}
    for name in names:
        mod, sep, column = name.partition(":")
        if not (sep and mod and column):
            raise SystemExit(
                f"cebmf fit: error: --var-covariates {name!r}: an .h5mu's feature covariates "
                "belong to one modality each; write them MOD:COLUMN (e.g. rna:log_mean)."
            )
        out.setdefault(mod, []).append(column)
    return out


# tl.fit's argument names -> this command's options, for error messages
_OPTIONS = {
    name: "--" + name.replace("_", "-")
    for name in (
        "obs_covariates",
        "var_covariates",
        "n_factors",
        "prior_loadings",
        "prior_factors",
        "key_added",
        "max_iter",
        "layer",
        "noise",
        "transform",
        "device",
    )
} | {"random_state": "--seed", "X_l": "--obs-covariates", "X_f": "--var-covariates"}
# run_demo's argument names -> ``cebmf demo``'s options
_DEMO_OPTIONS = {"out": "--out", "n_factors": "--n-factors", "max_iter": "--max-iter"}


def _as_options(message: str, options: dict[str, str] = _OPTIONS) -> str:
    """``message`` with the Python argument names in ``options`` (default: tl.fit's)
    written as the command's options (a one-word name only where it is given a value:
    ``layer='raw'``)."""
    plain = [n for n in options if "_" not in n]
    compound = [n for n in options if "_" in n]
    pattern = r"\b(" + "|".join(compound) + r")\b|\b(" + "|".join(plain) + r")(?==)"
    return re.sub(pattern, lambda m: options[m[1] or m[2]], message)


def _reason(err: OSError | ValueError | KeyError | TypeError) -> str:
    """``err`` in a few words: its type and the first line of its message."""
    text = str(err).splitlines()[0] if str(err) else "no detail"
    return f"{type(err).__name__}: {text}"


def _check_output(dest: Path) -> None:
    """Refuse, before any work, an output file that could not be written: ``dest`` is a
    folder, the nearest existing folder above it is a file, or either is not writable.
    The folders that are missing are created only when the result is written."""
    if dest.is_dir():
        raise SystemExit(
            f"cebmf fit: error: output {dest} is a folder; give the path of a file in it "
            f"(e.g. {dest / 'out'}{dest.suffix})."
        )
    if dest.exists():
        if not os.access(dest, os.W_OK):
            raise SystemExit(f"cebmf fit: error: output {dest} exists and is not writable.")
        return
    parent = dest.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise SystemExit(
            f"cebmf fit: error: cannot create output {dest}: {parent} is a file, not a "
            "folder; choose an output path in a folder."
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SystemExit(
            f"cebmf fit: error: cannot create output {dest}: the folder {parent} is not "
            "writable; choose an output path in a writable folder."
        )


def _read(src: Path):
    """The AnnData (``.h5ad``) or MuData (``.h5mu``) in ``src``; a file that cannot be
    read is a one-line error."""
    try:
        if src.suffix == ".h5mu":
            import mudata as md

            return md.read_h5mu(src)
        import anndata as ad

        return ad.read_h5ad(src)
    except (OSError, ValueError, KeyError, TypeError) as err:
        kind = "MuData (.h5mu)" if src.suffix == ".h5mu" else "AnnData (.h5ad)"
        raise SystemExit(
            f"cebmf fit: error: cannot read {src} as an {kind} file ({_reason(err)})."
        ) from None


def _fit(args: argparse.Namespace) -> int:
    from . import tl

    src = Path(args.input)
    if not src.exists():
        raise SystemExit(f"cebmf fit: error: input file {src} does not exist.")
    dest = Path(args.output)
    wanted = ".h5mu" if src.suffix == ".h5mu" else ".h5ad"
    if dest.suffix != wanted:
        raise SystemExit(
            f"cebmf fit: error: output {dest} must end in {wanted} (the input {src.name} is "
            f"{'a MuData' if wanted == '.h5mu' else 'an AnnData'} file)."
        )
    _check_output(dest)
    var_covariates = _names(args.var_covariates)
    if src.suffix == ".h5mu":
        var_covariates = _by_modality(var_covariates)
    data = _read(src)
    options = {}
    if args.max_iter is not None:
        options["max_iter"] = args.max_iter
    start = time.perf_counter()
    try:
        tl.fit(
            data,
            layer=args.layer,
            obs_covariates=_names(args.obs_covariates),
            var_covariates=var_covariates,
            n_factors=args.n_factors,
            prior_loadings=args.prior_loadings,
            prior_factors=args.prior_factors,
            noise=args.noise,
            transform=None if args.transform == "none" else args.transform,
            key_added=args.key_added,
            device=args.device,
            random_state=args.seed,
            progress=not args.quiet,
            **options,
        )
    except (ValueError, TypeError) as err:  # a user error: its message, no traceback
        raise SystemExit(f"cebmf fit: error: {_as_options(str(err))}") from None
    record = data.uns[args.key_added]
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        data.write_h5mu(dest) if wanted == ".h5mu" else data.write_h5ad(dest)
    except OSError as err:  # e.g. a full disk: the fit is lost, but no traceback
        raise SystemExit(f"cebmf fit: error: cannot write {dest} ({_reason(err)}).") from None
    if not args.quiet:
        print(
            f"cebmf fit: {len(record['pve'])} factors, ELBO {record['elbo_final']:.6g}, "
            f"converged={record['converged']} in {time.perf_counter() - start:.1f} s; "
            f"wrote {dest}"
            + (
                "\ncebmf fit: the cap (--n-factors) set the number of factors; a larger one "
                "lets the data choose"
                if record["max_factors_reached"]
                else ""
            )
        )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    try:  # run_demo checks its arguments before any work
        summary = run_demo(
            Path(args.out),
            n_factors=args.n_factors,
            max_iter=args.max_iter,
            progress=args.progress,
        )
    except (ValueError, TypeError) as err:  # a user error: its message, no traceback
        raise SystemExit(f"cebmf demo: error: {_as_options(str(err), _DEMO_OPTIONS)}") from None
    except OSError as err:  # e.g. a full disk
        raise SystemExit(
            f"cebmf demo: error: cannot write into --out {args.out} ({_reason(err)})."
        ) from None
    print(summary)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cebmf",
        description="Covariate-moderated Empirical Bayes Matrix Factorization.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    fit = sub.add_parser(
        "fit",
        help="fit EBMF / cEBMF to an .h5ad (or .h5mu) file and write the result",
        description="Fit cEBMF to IN (cells x genes, counts or transformed) and write OUT "
        "with obsm['X_<key>'], varm['<key>_factors'] and uns['<key>'].",
    )
    fit.add_argument("input", help="input .h5ad or .h5mu")
    fit.add_argument("output", help="output .h5ad or .h5mu")
    fit.add_argument("--layer", help="use this layer instead of X")
    fit.add_argument("--obs-covariates", help="comma-separated obs columns / obsm keys")
    fit.add_argument(
        "--var-covariates",
        help="comma-separated var columns / varm keys (.h5mu: MOD:COLUMN, e.g. rna:log_mean)",
    )
    fit.add_argument("--n-factors", type=int, default=30, help="most factors (default 30)")
    fit.add_argument("--prior-loadings", help="prior family of the loadings")
    fit.add_argument("--prior-factors", help="prior family of the factors")
    fit.add_argument("--noise", default="column", choices=["column", "row", "constant"])
    fit.add_argument(
        "--transform",
        default="auto",
        choices=["auto", "log1p_normalize", "log1p", "binary", "tfidf", "none"],
    )
    fit.add_argument("--key-added", default="cebmf")
    fit.add_argument("--device", default="auto", help="auto, cpu or cuda")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--max-iter", type=int, help="most backfit sweeps")
    fit.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary")
    fit.set_defaults(func=_fit)

    demo = sub.add_parser(
        "demo",
        help="run the whole path on scanpy's bundled pbmc68k_reduced counts",
        description="cEBMF with cell covariates on the integer counts of scanpy's "
        "pbmc68k_reduced; writes the AnnData and PNG figures to --out.",
    )
    demo.add_argument("--out", default="cebmf-demo", help="output folder (default cebmf-demo)")
    demo.add_argument("--n-factors", type=int, default=20, help="most factors (default 20)")
    demo.add_argument("--max-iter", type=int, default=80, help="most backfit sweeps (default 80)")
    demo.add_argument("--progress", action="store_true", help="show a progress bar")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
