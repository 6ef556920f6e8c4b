"""`fleet router calibrate|fit-head|set`: choose the router threshold τ, fit a linear gate head, or change
devices' router policy.

``fleet router calibrate BUNDLE --data LABELLED.npz [--max-accuracy-drop PTS] [--holdout F] [--confidence C]
[--plot OUT.png]`` runs both models of the bundle over labelled data (keys ``x``, ``y``), holds out a
share F of it, sweeps τ on the rest and prints a table (τ, large fraction, accuracy, drop against
large-only with its upper confidence bound, estimated throughput from measured model costs). It
recommends the τ with the fewest large-model calls whose *bound* on the drop is within PTS points, says
when the bundle's τ bound or the confidence bound decided it, and checks the choice on the held-out
part (its loss with an exact confidence interval). With too little data for the bound it says how much
would be needed. ``--plot`` draws the accuracy-vs-large fraction curve.

``fleet router set --devices ID,... [--gate G] [--tau T] ...`` changes running devices' router policy
(a signed ``set-router`` command sent by the controller).

``fleet router fit-head BUNDLE --data LABELLED.npz --out head.npz [--source features|input_stats]``
fits the ``linear`` gate's head (logistic regression predicting "the small model is wrong") to ship
in the next bundle.

BUNDLE is a bundle archive (``fleet bundle build`` output) or a folder holding ``manifest.json`` and the
files it lists. Use data the models were not trained on (``samples/digits/calib.npz``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Tuple

from edge_agent.clikit import CliError

if TYPE_CHECKING:  # numpy is imported where the data is read: every fleet command imports this module
    import numpy as np

MAX_MANIFEST_BYTES = 1 << 20
MAX_BUNDLE_BYTES = 8 << 30


@contextlib.contextmanager
def open_bundle(path: Path) -> Iterator[Tuple[object, Path]]:
    """Yield (ManifestBody, folder holding its files) for a bundle archive or an unpacked folder."""
    from edge_agent.bundle.verify import read_unverified
    from edge_agent.errors import EdgeAgentError

    path = Path(path)
    if path.is_dir():
        mpath = path / "manifest.json"
        try:
            raw = mpath.read_bytes()
        except OSError as e:
            raise CliError("cannot read %s: %s" % (mpath, e.strerror or e))
        try:
            yield read_unverified(raw, max_manifest_bytes=MAX_MANIFEST_BYTES), path
        except EdgeAgentError as e:
            raise CliError("%s: %s" % (mpath, e))
        return
    if not path.is_file():
        raise CliError("bundle %s does not exist" % path)
    from edge_agent.bundle.archive import read_bundle, unpack_bundle

    tmp = Path(tempfile.mkdtemp(prefix="fleet-router-"))
    try:
        try:
            raw, reader = read_bundle(path, max_manifest_bytes=MAX_MANIFEST_BYTES, max_bundle_bytes=MAX_BUNDLE_BYTES)
            reader.close()
            manifest = read_unverified(raw, max_manifest_bytes=MAX_MANIFEST_BYTES)
            folder = unpack_bundle(path, tmp / "b", manifest, max_bundle_bytes=MAX_BUNDLE_BYTES)
        except EdgeAgentError as e:
            raise CliError("bundle %s: %s" % (path, e))
        yield manifest, folder
    finally:
        shutil.rmtree(str(tmp), ignore_errors=True)


def load_labelled(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """(x, y) from an npz with keys `x` and `y`."""
    import numpy as np

    from edge_agent.npz import NpzError, load_npz

    try:
        z = load_npz(path)
    except NpzError as e:
        raise CliError("cannot read %s: %s" % (path, e)) from None
    if "x" not in z or "y" not in z:
        raise CliError("%s needs arrays `x` (inputs) and `y` (labels)" % path)
    try:
        x, y = z["x"], z["y"].astype(np.int64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise CliError("%s: labels `y` are not integers: %s" % (path, e)) from None
    if len(x) != len(y) or len(y) == 0:
        raise CliError("%s: x and y must hold the same, non-zero number of items" % path)
    return x, y


def _engines(manifest, folder: Path, batch: int):
    from edge_agent.engines.ort import OrtEngine
    from edge_agent.errors import EngineError

    try:
        small = OrtEngine(folder / manifest.models["small"].path, max_batch=batch)
        large = OrtEngine(folder / manifest.models["large"].path, max_batch=batch)
    except EngineError as e:
        raise CliError(str(e))
    return small, large


def _cast_input(x: np.ndarray, engine) -> np.ndarray:
    import numpy as np

    want = tuple(engine.inputs[0].shape[1:])
    if tuple(x.shape[1:]) != want:
        raise CliError("data items have shape %s, the model input wants %s" % (tuple(x.shape[1:]), want))
    return np.ascontiguousarray(x.astype(engine.inputs[0].dtype))


def _logits_name(manifest, engine) -> str:
    name = manifest.postprocessing.output or engine.outputs[0].name
    if manifest.postprocessing.kind != "classification":
        raise CliError("router calibration needs a classification bundle (labels to score accuracy)")
    return name


def _calibrate(args: argparse.Namespace) -> int:
    from edge_agent.runtime import calibration
    from edge_agent.runtime.errors import RouterPolicyError
    from edge_agent.runtime.router import LinearHead

    if args.max_accuracy_drop < 0 or args.batch < 1 or args.rows < 2:
        raise CliError("--max-accuracy-drop must be >= 0, --batch >= 1 and --rows >= 2", code=2)
    if not 0 < args.holdout < 1 or not 0.5 <= args.confidence < 1:
        raise CliError("--holdout must be within (0, 1) and --confidence within [0.5, 1)", code=2)
    x, y = load_labelled(Path(args.data))
    with open_bundle(Path(args.bundle)) as (manifest, folder):
        pol = manifest.router
        gate = args.gate or pol.gate
        head = None
        if gate == "linear":
            head_path = Path(args.head) if args.head else (folder / pol.linear_head if pol.linear_head else None)
            if head_path is None:
                raise CliError("the linear gate needs a head: the bundle ships none; pass --head HEAD.npz")
            try:
                head = LinearHead.load(head_path)
            except RouterPolicyError as e:
                raise CliError(str(e))
        small, large = _engines(manifest, folder, args.batch)
        try:
            x = _cast_input(x, small)
            data = calibration.collect(
                small, large, x, y, gate=gate, head=head, logits_output=_logits_name(manifest, small),
                features_output=manifest.models["small"].features_output, batch=args.batch,
            )
        except ValueError as e:
            raise CliError(str(e))
        finally:
            small.close()
            large.close()
    _report(args, data, gate, float(pol.tau_min), float(pol.tau_max))
    return 0


def _report(args: argparse.Namespace, data, gate: str, tau_min: float, tau_max: float) -> None:
    """Choose τ on the calibration part by the loss bound, check it on the held-out part, print both."""
    import math

    from edge_agent.runtime import calibration

    try:
        cal_idx, val_idx = calibration.split_holdout(len(data.scores), args.holdout, args.seed)
    except ValueError as e:
        raise CliError(str(e))
    cal, val = data.subset(cal_idx), data.subset(val_idx)
    conf, budget = args.confidence, args.max_accuracy_drop
    rows = calibration.sweep(cal, calibration.candidate_taus(cal.scores, tau_min, tau_max), confidence=conf)
    best = calibration.recommend(rows, max_drop_pts=budget)
    notes = calibration.binding_notes(cal, best, tau_min=tau_min, tau_max=tau_max, max_drop_pts=budget,
                                      confidence=conf)
    large_only = 1000.0 / data.cost_large_ms
    _print_table(rows, best, data, args.rows)
    print()
    print("items: %d (calibration %d, held out %d, seed %d)   gate: %s   tau bounds: [%g, %g]"
          % (len(data.scores), len(cal_idx), len(val_idx), args.seed, gate, tau_min, tau_max))
    print("calibration part: small-only accuracy %.4f, large-only accuracy %.4f"
          % (cal.small_accuracy, cal.large_accuracy))
    print("drop bound: one-sided %g%% Clopper-Pearson upper bound on the share of items lost to the small "
          "model (budget %g points)" % (conf * 100, budget))
    print("measured cost per item at batch %d: small %.4g ms, large %.4g ms"
          % (args.batch, data.cost_small_ms, data.cost_large_ms))
    print("(throughput estimates count model time only; per-request serving overhead comes on top)")
    for n in notes:
        print("note: " + n)
    check = None
    if best is not None:
        check = calibration.evaluate(val, best["tau"], confidence=conf)
        check["loss_interval_pts"] = [v * 100.0 for v in calibration.binomial_interval(
            check["losses"], check["items"], conf)]
    if args.plot:
        _plot(Path(args.plot), rows, best, data)
        print("plot written to %s" % args.plot)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "gate": gate, "rows": rows, "recommended": best, "heldout_check": check, "notes": notes,
            "confidence": conf, "max_accuracy_drop_pts": budget, "seed": args.seed,
            "calibration_items": len(cal_idx), "heldout_items": len(val_idx),
            "small_accuracy": cal.small_accuracy, "large_accuracy": cal.large_accuracy,
            "cost_small_ms": data.cost_small_ms, "cost_large_ms": data.cost_large_ms,
        }, indent=2) + "\n")
    if best is None:
        least = min(rows, key=lambda r: (r["drop_upper_pts"], r["large_fraction"]))
        need = math.ceil(math.log(1.0 - conf) / math.log(1.0 - budget / 100.0)) if 0 < budget < 100 else None
        raise CliError(
            "no tau within [%g, %g] has its %g%% bound on the accuracy drop within %g points (smallest: %.2f points "
            "at tau %.6g); use more calibration data (a loss-free bound under %g points needs %s items) or a "
            "larger budget" % (tau_min, tau_max, conf * 100, budget, least["drop_upper_pts"], least["tau"], budget,
                               need if need is not None else "n/a"))
    print("recommended tau = %.6g: large fraction %.3f, accuracy %.4f, %.2f points under large-only "
          "(%g%% upper bound %.2f points, %d of %d items lost), estimated %.2fx large-only throughput"
          % (best["tau"], best["large_fraction"], best["accuracy"], best["drop_pts"], conf * 100,
             best["drop_upper_pts"], best["losses"], best["items"], best["items_per_s"] / large_only))
    lo, hi = check["loss_interval_pts"]
    print("held-out check (%d items never used to choose tau): large fraction %.3f, accuracy %.4f vs large-only "
          "%.4f: %.2f points lost; %g%% interval on the loss [%.2f, %.2f] points; %s"
          % (check["items"], check["large_fraction"], check["accuracy"], val.large_accuracy, check["drop_pts"],
             conf * 100, lo, hi, "within the budget" if check["drop_pts"] <= budget + 1e-9
             else "OVER the %g-point budget" % budget))


def _print_table(rows, best, data, max_rows: int) -> None:
    import numpy as np

    show = rows
    if len(rows) > max_rows:
        idx = set(np.linspace(0, len(rows) - 1, max_rows).round().astype(int).tolist())
        show = [r for i, r in enumerate(rows) if i in idx or r is best]
    large_only = 1000.0 / data.cost_large_ms
    print("%12s  %14s  %9s  %9s  %11s  %14s  %9s" % ("tau", "large fraction", "accuracy", "drop pts", "drop bound",
                                                    "est. items/s", "vs large"))
    for r in show:
        mark = "  <- recommended" if r is best else ""
        print("%12.6g  %14.3f  %9.4f  %9.2f  %11.2f  %14.0f  %8.2fx%s"
              % (r["tau"], r["large_fraction"], r["accuracy"], r["drop_pts"], r["drop_upper_pts"], r["items_per_s"],
                 r["items_per_s"] / large_only, mark))


def _plot(out: Path, rows, best, data) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CliError("--plot needs matplotlib (pip install matplotlib, or the package's dev extra)")
    pts = sorted((r["large_fraction"], r["accuracy"]) for r in rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", ms=2, label="router (%s gate)" % data.gate)
    ax.axhline(data.large_accuracy, color="g", ls="--", lw=1, label="large only")
    ax.axhline(data.small_accuracy, color="r", ls=":", lw=1, label="small only")
    if best is not None:
        ax.plot([best["large_fraction"]], [best["accuracy"]], "k*", ms=12, label="recommended tau=%.4g" % best["tau"])
    ax.set_xlabel("fraction of items sent to the large model")
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy vs large-model fraction")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(str(out), dpi=120)
    except OSError as e:
        raise CliError("cannot write %s: %s" % (out, e.strerror or e))
    finally:
        plt.close(fig)


def _fit_head(args: argparse.Namespace) -> int:
    import numpy as np

    from edge_agent.runtime.router import fit_linear_head, input_stats

    if args.batch < 1:
        raise CliError("--batch must be >= 1", code=2)
    x, y = load_labelled(Path(args.data))
    with open_bundle(Path(args.bundle)) as (manifest, folder):
        small, _large = _engines(manifest, folder, args.batch)
        _large.close()
        try:
            x = _cast_input(x, small)
            logits_name = _logits_name(manifest, small)
            feats_name = manifest.models["small"].features_output
            if args.source == "features" and not feats_name:
                raise CliError("the bundle's small model declares no features_output")
            outs = [small.infer({small.inputs[0].name: x[s : s + args.batch]}) for s in range(0, len(x), args.batch)]
        finally:
            small.close()
    logits = np.concatenate([o[logits_name] for o in outs]).reshape(len(x), -1)
    wrong = logits.argmax(axis=1) != y
    if not wrong.any() or wrong.all():
        raise CliError("the small model is right on every item or on none: no signal to fit a head on")
    v = np.concatenate([o[feats_name] for o in outs]) if args.source == "features" else input_stats(x)
    head = fit_linear_head(v, wrong, source=args.source)
    head.save(Path(args.out))
    s = head.scores(v)
    print("fitted a %d-input head over %s on %d items (small wrong on %d)"
          % (head.dim, args.source, len(y), wrong.sum()))
    print("mean score: small wrong %.3f, small right %.3f" % (s[wrong].mean(), s[~wrong].mean()))
    print("wrote %s (ship it as router.linear_head)" % args.out)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `router` command group."""
    p = sub.add_parser("router", help="calibrate the small/large router", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    rsub = p.add_subparsers(dest="router_command", metavar="SUBCOMMAND")
    c = rsub.add_parser("calibrate", help="sweep tau over labelled data and recommend one")
    c.add_argument("bundle", help="bundle archive or unpacked bundle folder")
    c.add_argument("--data", required=True, help="npz with `x` (model inputs) and `y` (labels)")
    c.add_argument("--max-accuracy-drop", type=float, default=0.5, metavar="PTS",
                   help="allowed accuracy loss vs large-only, in percentage points, that the confidence bound "
                        "must meet (default 0.5)")
    c.add_argument("--holdout", type=float, default=0.3, metavar="FRACTION",
                   help="share of the data held out to check the chosen tau (default 0.3)")
    c.add_argument("--confidence", type=float, default=0.95, help="level of the loss bound (default 0.95)")
    c.add_argument("--seed", type=int, default=0, help="seed of the calibration/held-out split (default 0)")
    c.add_argument("--plot", metavar="OUT.png", help="draw accuracy vs large fraction (needs matplotlib)")
    c.add_argument("--gate", choices=["confidence", "linear"], help="gate to calibrate (default: the bundle's)")
    c.add_argument("--head", help="linear head npz (default: the bundle's router.linear_head)")
    c.add_argument("--batch", type=int, default=32, help="batch size for running and timing (default 32)")
    c.add_argument("--rows", type=int, default=20, help="table rows to print (default 20)")
    c.add_argument("--json", help="also write the sweep as JSON here")
    c.set_defaults(func=_calibrate)
    f = rsub.add_parser("fit-head", help="fit the linear gate's head on labelled data")
    f.add_argument("bundle", help="bundle archive or unpacked bundle folder")
    f.add_argument("--data", required=True, help="npz with `x` and `y` the models were not trained on")
    f.add_argument("--out", required=True, help="where to write the head npz")
    f.add_argument("--source", choices=["features", "input_stats"], default="features")
    f.add_argument("--batch", type=int, default=32)
    f.set_defaults(func=_fit_head)
    _register_set(rsub)
    p.set_defaults(func=lambda _args: _usage(p))


def _register_set(rsub: argparse._SubParsersAction) -> None:
    from fleet.commands._connect import add_connection_args

    s = rsub.add_parser("set", help="change devices' router policy now (signed set-router command)",
                        description="Change the router policy of running devices: the controller signs and "
                        "sends a set-router command; each device answers with a router-changed or "
                        "command-refused event (see `fleet devices`). large-only skips the small model; "
                        "small-only never escalates. tau must lie within the bundle's bounds.")
    s.add_argument("--devices", action="append", metavar="ID[,ID...]", required=True, help="devices to change")
    s.add_argument("--gate", choices=["confidence", "linear", "small-only", "large-only"])
    s.add_argument("--tau", help="threshold, a decimal within the bundle's [tau_min, tau_max]")
    s.add_argument("--target-large-fraction", metavar="F", help="share of items to send to large (0-1)")
    s.add_argument("--adaptive", choices=["on", "off"], help="adapt tau to the target large fraction")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    add_connection_args(s)
    s.set_defaults(func=_set)


def _set(args: argparse.Namespace) -> int:
    from decimal import Decimal, InvalidOperation

    from fleet.commands._connect import rpc_call, split_ids

    devices = split_ids(args.devices)
    adaptive = None if args.adaptive is None else args.adaptive == "on"
    params = {"devices": devices, "gate": args.gate, "adaptive": adaptive}
    for key, v in (("tau", args.tau), ("target_large_fraction", args.target_large_fraction)):
        if v is None:
            continue
        try:
            d = Decimal(v)
        except InvalidOperation:
            raise CliError("--%s %r is not a decimal number" % (key.replace("_", "-"), v))
        if not d.is_finite():
            raise CliError("--%s must be finite" % key.replace("_", "-"))
        params[key] = str(d)
    if all(params[k] is None for k in ("gate", "adaptive")) and "tau" not in params and \
            "target_large_fraction" not in params:
        raise CliError("give at least one of --gate, --tau, --target-large-fraction, --adaptive")
    r = rpc_call(args, "router.set", {k: v for k, v in params.items() if v is not None})
    if args.json:
        print(json.dumps(r, sort_keys=True))
    else:
        for d in r.get("sent", []):
            print("set-router sent to %s" % d)
        for d, why in sorted((r.get("failed") or {}).items()):
            print("NOT sent to %s: %s" % (d, why))
    return 1 if r.get("failed") else 0


def _usage(p: argparse.ArgumentParser) -> Optional[int]:
    p.print_help()
    return 2
