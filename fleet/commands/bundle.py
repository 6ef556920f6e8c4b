"""`fleet bundle build|verify|inspect`: make, check and look inside signed bundles."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from edge_agent.bundle.archive import check_bundle_files, read_bundle
from edge_agent.bundle.verify import manifest_digest, parse_body, parse_document, verify_manifest
from edge_agent.clikit import CliError
from edge_agent.config import LimitsConfig
from edge_agent.errors import BundleError
from edge_agent.signing import PrivateKey, SignatureError, load_public_keys


def _fmt_time(t: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _build(args: argparse.Namespace) -> int:
    """Build and sign a bundle from a SPEC."""
    from fleet.bundle_builder import build_bundle
    from fleet.bundle_spec import parse_engine_option

    try:
        keys = [PrivateKey.load(Path(k)) for k in args.key]
    except SignatureError as e:
        raise CliError(str(e))
    engines = [parse_engine_option(e) for e in args.engine or []]
    out = Path(args.out)
    body = build_bundle(Path(args.spec), keys, out, engines)
    raw_size = out.stat().st_size
    print("built %s version %d -> %s (%d files, %d bytes)" % (body.name, body.version, out, len(body.files), raw_size))
    print("signed by %s; expires %s" % (", ".join(k.keyid[:16] for k in keys), _fmt_time(body.expires)))
    return 0


def _verify(args: argparse.Namespace) -> int:
    """Verify signatures, expiry and every file hash of a bundle."""
    limits = LimitsConfig()
    if args.threshold < 1:
        raise CliError("--threshold must be at least 1", code=2)
    try:
        trusted = load_public_keys([Path(p) for p in args.trusted])
    except SignatureError as e:
        raise CliError(str(e))
    if not trusted:
        raise CliError("no trusted public keys found in %s" % " ".join(args.trusted))
    try:
        raw, reader = read_bundle(
            Path(args.bundle), max_manifest_bytes=limits.max_manifest_bytes, max_bundle_bytes=limits.max_bundle_bytes
        )
        with reader:
            body = verify_manifest(
                raw,
                trusted=trusted,
                threshold=args.threshold,
                now=int(time.time()),
                highest_versions={},
                max_manifest_bytes=limits.max_manifest_bytes,
            )
            check_bundle_files(reader, body, max_file_bytes=limits.max_file_bytes)
    except BundleError as e:
        raise CliError("bundle refused (%s): %s" % (type(e).__name__, e))
    print("OK %s version %d (manifest sha256 %s)" % (body.name, body.version, manifest_digest(raw)))
    print("expires %s" % _fmt_time(body.expires))
    for path, f in sorted(body.files.items()):
        print("  %-40s %10d  %s" % (path, f.size, f.sha256))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    """Show what a bundle holds. Nothing is verified: use `fleet bundle verify` for that."""
    limits = LimitsConfig()
    try:
        raw, reader = read_bundle(
            Path(args.bundle), max_manifest_bytes=limits.max_manifest_bytes, max_bundle_bytes=limits.max_bundle_bytes
        )
        with reader:
            members = [{"name": m.name, "kind": m.kind, "size": m.size} for m in reader.members.values()]
        signed, signatures = parse_document(raw, max_manifest_bytes=limits.max_manifest_bytes)
        body = parse_body(signed)
    except BundleError as e:
        raise CliError("cannot inspect bundle (%s): %s" % (type(e).__name__, e))
    if args.json:
        doc = {
            "manifest": {"signed": signed, "signatures": signatures},
            "manifest_sha256": manifest_digest(raw),
            "members": members,
            "verified": False,
        }
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    print("bundle %s version %d  (NOT verified; see `fleet bundle verify`)" % (body.name, body.version))
    print("created %s, expires %s" % (_fmt_time(body.created), _fmt_time(body.expires)))
    if body.description:
        print("description: %s" % body.description)
    keyids = [str(s.get("keyid", "?"))[:16] for s in signatures if isinstance(s, dict)]
    print("signatures: %s" % (", ".join(keyids) or "none"))
    for mname, m in sorted(body.models.items()):
        ins = ", ".join("%s %s %s" % (t.name, t.dtype, t.shape) for t in m.inputs)
        outs = ", ".join("%s %s %s" % (t.name, t.dtype, t.shape) for t in m.outputs)
        print("model %s: %s  in: %s  out: %s" % (mname, m.path, ins, outs))
        for pk, plan in sorted(m.engines.items()):
            print("  prebuilt engine %s: %s" % (pk, plan))
    r = body.router
    print("router: gate=%s tau=%s [%s, %s]" % (r.gate, r.tau, r.tau_min, r.tau_max))
    print("postprocessing: %s" % body.postprocessing.kind)
    print("files:")
    for path, f in sorted(body.files.items()):
        print("  %-40s %10d  %s" % (path, f.size, f.sha256[:16]))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `bundle` command group."""
    p = sub.add_parser("bundle", help="build, verify and inspect signed bundles", description=__doc__)
    bsub = p.add_subparsers(dest="bundle_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: p.print_help() or 2)

    b = bsub.add_parser("build", help=_build.__doc__, description=_build.__doc__)
    b.add_argument("spec", metavar="SPEC", help="bundle SPEC (TOML), e.g. samples/digits/bundle.toml")
    b.add_argument("--key", action="append", required=True, metavar="KEYFILE",
                   help="signing key (.key); repeat for several signatures")
    b.add_argument("--out", required=True, metavar="BUNDLE", help="bundle file to write")
    b.add_argument("--engine", action="append", metavar="PLATFORM_KEY=MODEL:PLAN",
                   help="include a prebuilt TensorRT plan, e.g. trt8.5.2.2-sm72-xavier-nx=large:l.plan (repeatable)")
    b.set_defaults(func=_build)

    v = bsub.add_parser("verify", help=_verify.__doc__, description=_verify.__doc__)
    v.add_argument("bundle", metavar="BUNDLE")
    v.add_argument("--trusted", nargs="+", required=True, metavar="PUBKEY",
                   help="trusted public keys (.pub files or folders of them)")
    v.add_argument("--threshold", type=int, default=1, help="valid signatures required (default 1)")
    v.set_defaults(func=_verify)

    i = bsub.add_parser("inspect", help=_inspect.__doc__.splitlines()[0], description=_inspect.__doc__)
    i.add_argument("bundle", metavar="BUNDLE")
    i.add_argument("--json", action="store_true", help="print the manifest and members as JSON")
    i.set_defaults(func=_inspect)
