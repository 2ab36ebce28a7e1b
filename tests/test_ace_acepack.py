"""Agreement of :func:`pcace.ace` with R's acepack (Friedman's Fortran), the reference.

Three sources of acepack answers:

* the 36 shared fixtures (``../shared/fixtures/acepack``, ``ace(x, y)`` with defaults);
* our own cases, ``tests/fixtures/acepack_extra`` (made by ``make_cases.R`` there), with
  other families and seeds and with acepack's ``mon=``, ``lin=``, ``cat=`` and ``delrsq``;
* fresh random problems solved by a live ``Rscript`` (marker ``acepack``; skipped where R
  or acepack is missing).

The same folder holds acepack's smoother alone (its internal ``smothr``, the routine ace()
calls at every update) on single scatterplots, which both backends' smoothers must
reproduce to 1e-7.

Both backends are held to the same thresholds: ``|rho - rho_acepack| <= 0.02`` on at
least 90% of the cases and ``<= 0.05`` on all; ``corr(theta, theta_acepack) >= 0.98``
wherever ``rho_acepack > 0.5``; the same bounds for ``rsq``.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pcace import ace

HERE = Path(__file__).resolve().parent
EXTRA = HERE / "fixtures" / "acepack_extra"
BACKENDS = ("numba", "torch")

CLOSE, FAR, SHARE = 0.02, 0.05, 0.90  # |diff| <= CLOSE on >= SHARE of cases, <= FAR on all
THETA_CORR, STRONG = 0.98, 0.5  # corr(theta) >= THETA_CORR where rho_acepack > STRONG


# ----------------------------------------------------------------------------------------
# Loading cases and solving them once per backend
# ----------------------------------------------------------------------------------------


@functools.cache
def load_shared(root: Path) -> tuple[dict, ...]:
    summary = pd.read_csv(root / "acepack.csv").set_index("file")
    cases = []
    for entry in json.loads((root / "cases.json").read_text()):
        data = np.loadtxt(root / entry["file"], delimiter=",", ndmin=2)
        transforms = np.loadtxt(root / f"transforms_{entry['id']:03d}.csv", delimiter=",",
                                ndmin=2)
        row = summary.loc[entry["file"]]
        cases.append({"id": entry["id"], "name": entry["name"], "group": "plain",
                      "x": data[:, :-1], "y": data[:, -1], "kw": {},
                      "tx": transforms[:, :-1], "ty": transforms[:, -1],
                      "rho": float(row["rho"]), "rsq": float(row["rsq"])})
    return tuple(cases)


@functools.cache
def load_extra(root: Path = EXTRA) -> tuple[dict, ...]:
    index = json.loads((root / "cases.json").read_text())
    cases = []
    for entry in index["cases"]:
        data = pd.read_csv(root / entry["file"]).to_numpy(dtype=np.float64)
        transforms = pd.read_csv(root / entry["transforms"]).to_numpy(dtype=np.float64)
        kw = {"x_kind": entry["x_kind"], "y_kind": entry["y_kind"], "delrsq": entry["delrsq"]}
        cases.append({"id": entry["id"], "name": entry["name"], "group": entry["group"],
                      "x": data[:, :-1], "y": data[:, -1], "kw": kw,
                      "tx": transforms[:, :-1], "ty": transforms[:, -1],
                      "rho": entry["rho"], "rsq": entry["rsq"]})
    return tuple(cases)


def solve(backend: str, x: np.ndarray, y: np.ndarray, **kw) -> dict:
    if backend == "torch":
        res = ace(torch.from_numpy(x), torch.from_numpy(y), **kw)
        assert isinstance(res.rho, torch.Tensor)  # the torch backend really ran
        return {"rho": float(res.rho), "rsq": float(res.rsq), "theta": res.theta.numpy(),
                "phi": res.phi.numpy()}
    res = ace(x, y, **kw)
    return {"rho": float(res.rho), "rsq": float(res.rsq), "theta": res.theta, "phi": res.phi}


@functools.cache
def paired(root: Path, backend: str) -> list[tuple[dict, dict]]:
    """(acepack case, our result) for every case under ``root``, solved once per backend."""
    cases = load_extra(root) if root == EXTRA else load_shared(root)
    return [(c, solve(backend, c["x"], c["y"], **c["kw"])) for c in cases]


@pytest.fixture(scope="module")
def shared_root(shared_dir) -> Path:
    root = Path(shared_dir) / "fixtures" / "acepack"
    if not (root / "cases.json").is_file():
        pytest.skip(f"{root} holds no acepack fixtures")
    return root


def unzip(pairs) -> tuple[list, list]:
    return [c for c, _ in pairs], [g for _, g in pairs]


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    if np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


# ----------------------------------------------------------------------------------------
# Checks shared by all sources
# ----------------------------------------------------------------------------------------


def check_close(cases, got, key: str, close: float = CLOSE, far: float = FAR,
                share: float = SHARE) -> None:
    diffs = np.array([abs(g[key] - c[key]) for c, g in zip(cases, got, strict=True)])
    worst = np.argsort(diffs)[::-1][:5]
    detail = ", ".join(f"case {cases[i]['id']} ({cases[i]['name']}): {diffs[i]:.4f}"
                       for i in worst)
    frac = float(np.mean(diffs <= close))
    assert frac >= share, f"{key}: only {frac:.0%} within {close}; worst {detail}"
    assert diffs.max() <= far, f"{key}: some beyond {far}; worst {detail}"


def check_transforms(cases, got) -> None:
    bad = []
    for c, g in zip(cases, got, strict=True):
        if c["rho"] <= STRONG:
            continue
        r_theta = pearson(g["theta"], c["ty"])
        r_total = pearson(g["phi"].sum(axis=1), c["tx"].sum(axis=1))
        if not (r_theta >= THETA_CORR and r_total >= THETA_CORR):
            bad.append(f"case {c['id']} ({c['name']}): corr theta {r_theta:.4f}, "
                       f"corr sum phi {r_total:.4f}")
    assert not bad, "transforms differ from acepack's: " + "; ".join(bad)


# ----------------------------------------------------------------------------------------
# The shared fixtures
# ----------------------------------------------------------------------------------------


def test_shared_fixtures_are_all_there(shared_root):
    cases = load_shared(shared_root)
    assert len(cases) == 36
    for c in cases:
        assert c["x"].shape[0] == c["y"].shape[0] == c["tx"].shape[0]
        assert c["x"].shape[1] == c["tx"].shape[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_fixtures_rho_matches_acepack(shared_root, backend):
    check_close(*unzip(paired(shared_root, backend)), "rho")


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_fixtures_rsq_matches_acepack(shared_root, backend):
    check_close(*unzip(paired(shared_root, backend)), "rsq")


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_fixtures_transforms_match_acepack(shared_root, backend):
    check_transforms(*unzip(paired(shared_root, backend)))


# ----------------------------------------------------------------------------------------
# Our own cases (tests/fixtures/acepack_extra)
# ----------------------------------------------------------------------------------------

EDGE = "ties_edge"  # known trouble spot, held to the same bounds in its own test below
GROUPS = ("plain", "monotone", "linear", "categorical", "mixed", "delrsq", EDGE)


def extra_subset(backend: str, keep) -> tuple[list, list]:
    return unzip([(c, g) for c, g in paired(EXTRA, backend) if keep(c)])


def test_extra_fixtures_cover_the_options():
    cases = load_extra()
    assert {c["group"] for c in cases} == set(GROUPS)
    kinds_x = {kind for c in cases for kind in c["kw"]["x_kind"]}
    kinds_y = {c["kw"]["y_kind"] for c in cases}
    assert kinds_x == kinds_y == {"ordered", "monotone", "linear", "categorical"}
    assert {c["x"].shape[0] for c in cases} >= {30, 75, 200, 500, 2000}
    assert {c["x"].shape[1] for c in cases} >= set(range(1, 7))
    assert len({c["kw"]["delrsq"] for c in cases}) >= 3
    size = sum(f.stat().st_size for f in EXTRA.iterdir())
    assert size < 2_000_000


@pytest.mark.parametrize("backend", BACKENDS)
def test_extra_fixtures_rho_and_rsq_match_acepack(backend):
    cases, got = extra_subset(backend, lambda c: c["group"] != EDGE)
    check_close(cases, got, "rho")
    check_close(cases, got, "rsq")


# A point alone at the end of the data beside tied values has leverage 1 in its end window:
# its leave-one-out residual is 0/0. acepack divides anyway and the NaN/inf it gets spreads
# through its running sums, so its answer there depends on rounding; pcace takes the residual
# as "infinitely large" (that span cannot judge the point), the same in both backends. These
# cases are kept, strictly expected to differ from acepack, so that the deviation stays
# documented and visible.
ACEPACK_UNDEFINED = pytest.mark.xfail(
    strict=True, reason="leverage-1 points: acepack's result is 0/0-dependent (see comment)")
GROUP_PARAMS = [pytest.param(g, marks=ACEPACK_UNDEFINED) if g == EDGE else g for g in GROUPS]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group", GROUP_PARAMS)
def test_extra_fixtures_by_option(backend, group):
    """Every case of an option group within FAR of acepack, transforms alike."""
    cases, got = extra_subset(backend, lambda c: c["group"] == group)
    assert cases
    check_close(cases, got, "rho", share=1.0, close=FAR)
    check_transforms(cases, got)


@pytest.mark.parametrize("backend", BACKENDS)
def test_constant_column_is_zero_as_in_acepack(backend):
    ((case, got),) = [(c, g) for c, g in paired(EXTRA, backend)
                      if c["name"] == "constant_column"]
    constant = np.flatnonzero(np.ptp(case["x"], axis=0) == 0)
    assert constant.size == 1
    assert np.all(case["tx"][:, constant] == 0)  # the premise: acepack returns 0 there
    np.testing.assert_allclose(got["phi"][:, constant], 0.0, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_typical_agreement_is_much_tighter_than_the_bounds(shared_root, backend):
    """The engine follows acepack's iteration; most cases agree to 1e-3 or better."""
    pairs = paired(shared_root, backend) + paired(EXTRA, backend)
    diffs = np.array([abs(g["rho"] - c["rho"]) for c, g in pairs if c["group"] != EDGE])
    assert np.quantile(diffs, 0.9) <= 1e-3, np.round(np.sort(diffs)[-10:], 5)


# ----------------------------------------------------------------------------------------
# The smoother alone, against acepack's smothr
# ----------------------------------------------------------------------------------------

SMOOTH_TOL = 1e-7  # acepack's running updates and our window sums differ by about 1e-8


@functools.cache
def smooth_cases() -> tuple[dict, ...]:
    index = json.loads((EXTRA / "smooth_cases.json").read_text())
    cases = []
    for entry in index["cases"]:
        data = pd.read_csv(EXTRA / entry["file"]).to_numpy(dtype=np.float64)
        cases.append({**entry, "x": data[:, 0], "y": data[:, 1], "smo": data[:, 2]})
    return tuple(cases)


SMOOTH_GROUPS = ("ordered_plain", "ordered_ties", "ordered_fading", "ordered_negative_woofer",
                 "ordered_isolated_end", "monotone_plain", "monotone_ties", "linear_plain",
                 "categorical_ties")


def smooth_with(backend: str, kind: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """One smoothing of sorted ``x``, with the bass enhancement acepack's ace() uses."""
    if backend == "torch":
        from pcace.maxcorr.smoothers import SortedAxis, smooth

        axis = SortedAxis(torch.from_numpy(x)[None])
        return smooth(kind, axis, torch.from_numpy(y)[None], 5.0)[0].numpy()
    from pcace.maxcorr import kernels as nb  # the compiled backend's own smoother (internal)

    return nb._smooth(nb.KIND_CODES[kind], nb._axis(x), y.copy(), 5.0)


def test_smoother_fixtures_cover_the_groups():
    assert {c["group"] for c in smooth_cases()} == set(SMOOTH_GROUPS)
    assert any(c["negative_woofer_cv"] for c in smooth_cases())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group", [pytest.param(g, marks=ACEPACK_UNDEFINED)
                                   if g == "ordered_isolated_end" else g
                                   for g in SMOOTH_GROUPS])
def test_smoother_matches_acepack_smothr(backend, group):
    bad = []
    for c in smooth_cases():
        if c["group"] != group:
            continue
        got = smooth_with(backend, c["kind"], c["x"], c["y"])
        err = float(np.abs(got - c["smo"]).max())
        if not err <= SMOOTH_TOL:
            where = int(np.argmax(np.abs(got - c["smo"])))
            bad.append(f"case {c['id']} (n={c['n']}): max |diff| {err:.2e} at sorted "
                       f"position {where}")
    assert not bad, f"{group}: " + "; ".join(bad)


# ----------------------------------------------------------------------------------------
# Live: fresh random problems through Rscript
# ----------------------------------------------------------------------------------------


def _acepack_available() -> bool:
    if shutil.which("Rscript") is None:
        return False
    probe = subprocess.run(["Rscript", "-e", "library(acepack)"], capture_output=True)
    return probe.returncode == 0


LIVE_SCRIPT = r"""
library(acepack)
args <- commandArgs(trailingOnly = TRUE)
dir <- args[1]
spec <- read.csv(file.path(dir, "spec.csv"), colClasses = "character")
opt <- function(s) if (is.na(s) || s == "") NULL else as.integer(strsplit(s, ";")[[1]])
for (i in seq_len(nrow(spec))) {
  d <- as.matrix(read.csv(file.path(dir, sprintf("p%d.csv", i - 1)), header = FALSE))
  k <- ncol(d) - 1
  a <- ace(d[, 1:k, drop = FALSE], d[, k + 1], mon = opt(spec$mon[i]), lin = opt(spec$lin[i]),
           cat = opt(spec$cat[i]))
  write.table(cbind(a$tx, a$ty), file.path(dir, sprintf("t%d.csv", i - 1)), sep = ",",
              row.names = FALSE, col.names = FALSE)
}
"""

CODES = {"monotone": "mon", "linear": "lin", "categorical": "cat"}


def live_problems(rng: np.random.Generator) -> list[dict]:
    """Continuous data (no isolated extremes next to ties) with a random mix of options."""
    problems = []
    for i in range(8):
        n = int(rng.choice([60, 150, 400]))
        k = int(rng.integers(1, 5))
        x = rng.normal(size=(n, k))
        shape = rng.integers(0, 3)
        signal = [np.sin(2 * x[:, 0]), x[:, 0] ** 2, np.exp(x[:, 0] / 2)][shape]
        y = signal * rng.uniform(0.3, 2) + rng.normal(size=n)
        x_kind, y_kind = ["ordered"] * k, "ordered"
        if i % 4 == 1:
            x_kind[0] = "monotone"
        elif i % 4 == 2:
            x[:, -1] = rng.integers(0, 5, size=n)
            x_kind[-1] = "categorical"
            y = y + x[:, -1] * 0.5
        elif i % 4 == 3:
            y_kind = str(rng.choice(["monotone", "linear"]))
        problems.append({"x": x, "y": y, "x_kind": x_kind, "y_kind": y_kind})
    return problems


@pytest.mark.acepack
@pytest.mark.skipif(not _acepack_available(), reason="needs Rscript with acepack")
def test_live_random_problems_match_acepack(tmp_path):
    seed = int(os.environ.get("PCACE_ACEPACK_SEED", np.random.SeedSequence().entropy % 2**32))
    problems = live_problems(np.random.default_rng(seed))
    spec = []
    for i, p in enumerate(problems):
        np.savetxt(tmp_path / f"p{i}.csv", np.column_stack([p["x"], p["y"]]), delimiter=",",
                   fmt="%.17g")
        cols = {code: ";".join(str(j + 1) for j, kind in enumerate(p["x_kind"]) if kind == name)
                for name, code in CODES.items()}
        if p["y_kind"] != "ordered":
            code = CODES[p["y_kind"]]
            cols[code] = ";".join(filter(None, [cols[code], "0"]))
        spec.append(cols)
    pd.DataFrame(spec, columns=["mon", "lin", "cat"]).to_csv(tmp_path / "spec.csv", index=False)
    script = tmp_path / "live.R"
    script.write_text(LIVE_SCRIPT)
    done = subprocess.run(["Rscript", str(script), str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for backend in BACKENDS:
        diffs = []
        for i, p in enumerate(problems):
            t = np.loadtxt(tmp_path / f"t{i}.csv", delimiter=",", ndmin=2)
            rho_r = pearson(t[:, :-1].sum(axis=1), t[:, -1])
            got = solve(backend, p["x"], p["y"], x_kind=p["x_kind"], y_kind=p["y_kind"])
            diffs.append(abs(got["rho"] - rho_r))
            if rho_r > STRONG:
                assert pearson(got["theta"], t[:, -1]) >= THETA_CORR, (
                    f"seed {seed}, problem {i} ({backend}): theta differs from acepack's")
        diffs = np.array(diffs)
        assert diffs.max() <= FAR, f"seed {seed} ({backend}): |rho diff| {np.round(diffs, 4)}"
        assert np.median(diffs) <= CLOSE, f"seed {seed} ({backend}): {np.round(diffs, 4)}"
