"""`fleet keygen --out DIR [--name NAME]`: create an Ed25519 signing key pair (NAME.key, NAME.pub)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from edge_agent.clikit import CliError
from edge_agent.signing import PrivateKey

NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-"


def write_key_pair(out: Path, name: str) -> PrivateKey:
    """Write NAME.key (mode 0600) and NAME.pub into `out`; refuses to overwrite either file."""
    if not name or name.startswith(".") or any(c not in NAME_CHARS for c in name):
        raise CliError("key name %r may use only letters, digits, '_', '.', '-' (not leading '.')" % name)
    out.mkdir(parents=True, exist_ok=True)
    key_path = out / ("%s.key" % name)
    pub_path = out / ("%s.pub" % name)
    for p in (key_path, pub_path):
        if p.exists() or p.is_symlink():
            raise CliError("%s already exists; refusing to overwrite a key (pick another --name or folder)" % p)
    key = PrivateKey.generate(name)
    fd = os.open(str(key_path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(key.to_text())
        os.chmod(str(key_path), 0o600)  # the umask may have narrowed it further; never wider
        fd = os.open(str(pub_path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(key.public.to_text())
    except BaseException:
        for p in (key_path, pub_path):
            if p.exists():
                p.unlink()
        raise
    return key


def _run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    try:
        key = write_key_pair(out, args.name)
    except OSError as e:
        raise CliError("cannot write keys into %s: %s" % (out, e.strerror or e))
    print("wrote %s (secret, mode 0600) and %s" % (out / (args.name + ".key"), out / (args.name + ".pub")))
    print("key id %s" % key.keyid)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `keygen` command."""
    p = sub.add_parser("keygen", help="create an Ed25519 signing key pair", description=__doc__)
    p.add_argument("--out", required=True, help="folder for NAME.key and NAME.pub")
    p.add_argument("--name", default="release", help="key name (default: release)")
    p.set_defaults(func=_run)
