"""The deployment state machine: fetch → verify → prepare → self-test → activate (→ probation).

`Deployer` does the I/O around the pure checks: it fetches the manifest first and verifies it
(signatures, version above the highest trusted one, expiry against the trusted clock, size limits)
before a single payload byte is requested; then fetches only the files the store lacks; builds the
bundle tree from verified objects; prepares engines and runs the golden self-test through callables
the agent supplies; and only then activates. Trusted state (`state.json`) changes only after a step
succeeded, so a failure at any step leaves the running model serving and the state valid.

Probation (issue: device-side health gates) plugs in through `Hooks.probation`: it is called after
activation and returns None (committed) or a reason string, on which the deployer rolls back to the
previous bundle by itself.

This module stays over 400 lines: it is one state machine (deploy, install, probation, rollback,
side-load) whose steps share the Deployer's state reporting and failure handling, read best in order.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional

from edge_agent.bundle.manifest import ManifestBody
from edge_agent.bundle.store import BundleStore
from edge_agent.bundle.store_state import BundleRecord, PendingDeploy
from edge_agent.bundle.verify import manifest_digest, verify_manifest
from edge_agent.config import LimitsConfig
from edge_agent.errors import (
    ArchiveError,
    BundleError,
    EdgeAgentError,
    EngineError,
    ManifestError,
    ResourceError,
    TransportError,
)
from edge_agent.protocol.messages import BundleRef, DeployArgs, DeployState, RollbackArgs
from edge_agent.protocol.trusted_time import future_reason, raised_floor, trusted_now
from edge_agent.signing import PublicKey
from edge_agent.transfer.fetcher import Fetcher, TransferCancelled

log = logging.getLogger(__name__)

Emit = Callable[..., None]


class SelfTestError(EngineError):
    """The golden self-test failed: the bundle is not activated."""


class CandidateRefusedError(EdgeAgentError):
    """A shadow / A-B candidate that cannot run beside the active bundle (memory) or failed its gates."""


@dataclass
class Hooks:
    """What the deployer needs from the rest of the agent (engines, runtime, probation)."""

    #: (bundle_dir, manifest) -> prepared models (engines built or loaded).
    prepare: Callable[[Path, ManifestBody], Any]
    #: (prepared, bundle_dir, manifest) -> report with `.passed` and `.message`.
    selftest: Callable[[Any, Path, ManifestBody], Any]
    #: (prepared, bundle_dir, manifest) -> None: start serving it (the old one is closed by the agent).
    activate: Callable[[Any, Path, ManifestBody], None]
    #: release prepared models that will not be activated.
    discard: Callable[[Any], None] = lambda prepared: None
    #: (record, manifest) -> None when probation passes, else the reason (the deployer rolls back).
    probation: Optional[Callable[[BundleRecord, ManifestBody], Optional[str]]] = None
    #: shadow / A-B deploys: (bundle_dir, manifest) -> prepared candidate models, checked against the
    #: memory left beside the active bundle (default: `prepare`).
    prepare_candidate: Optional[Callable[[Path, ManifestBody], Any]] = None
    #: shadow / A-B deploys: (prepared, bundle_dir, manifest, args, record) -> None: run the self-tested
    #: candidate beside the active bundle instead of activating it.
    start_candidate: Optional[Callable[[Any, Path, ManifestBody, DeployArgs, BundleRecord], None]] = None


def resource_reason(e: BaseException) -> str:
    """A short machine-readable reason for a local resource failure: "disk full", "store quota" or
    "resource"."""
    cause = e.__cause__ or e.__context__
    if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return "disk full"
    text = str(e)
    if "quota" in text:
        return "store quota"
    if "disk full" in text or "No space left" in text or "ENOSPC" in text:
        return "disk full"
    return "resource"


class Deployer:
    """Runs one deployment at a time (called from the agent's worker thread)."""

    def __init__(
        self,
        store: BundleStore,
        *,
        hooks: Hooks,
        trusted_keys: Callable[[], Mapping[str, PublicKey]],
        threshold: int,
        limits: LimitsConfig,
        emit: Emit,
        on_state: Callable[[DeployState], None],
        fetcher: Optional[Fetcher] = None,
        clock: Callable[[], float] = time.time,
        stopping: Callable[[], bool] = lambda: False,
        max_clock_skew_s: int = 3600,
    ) -> None:
        self.store = store
        self.hooks = hooks
        self.trusted_keys = trusted_keys
        self.threshold = threshold
        self.limits = limits
        self.emit = emit
        self.on_state = on_state
        self.fetcher = fetcher
        self.clock = clock
        self.stopping = stopping
        self.max_clock_skew_s = max_clock_skew_s
        self.last_fetch: Optional[Dict[str, Any]] = None

    # ------------------------------------------------------------------------------------ helpers

    def _state(self, state: str, bundle: Optional[BundleRef], detail: Optional[str] = None,
               rollout_id: Optional[str] = None, persist: bool = True) -> None:
        ds = DeployState(state=state, bundle=bundle, detail=detail, rollout_id=rollout_id, since=self.clock())
        if persist:
            self.store.update_state(deploy=ds)
        self.on_state(ds)

    def now(self) -> int:
        """Trusted time: max(system clock, persisted floor)."""
        return trusted_now(self.clock(), self.store.state.time_floor)

    def floor_update(self, stamp: int, source: str) -> Dict[str, Any]:
        """State changes for accepting a document signed by `source` at `stamp`: the bounded new time floor
        (protocol/trusted_time.py)."""
        st = self.store.state
        floor, seen = raised_floor(st.time_floor, stamp, source=source, seen=st.signed_time_seen,
                                   clock=self.clock(), skew_s=self.max_clock_skew_s)
        return {"time_floor": floor, "signed_time_seen": seen}

    def _verify(self, raw: bytes, expect: Optional[BundleRef]) -> ManifestBody:
        st = self.store.state
        body = verify_manifest(
            raw, trusted=self.trusted_keys(), threshold=self.threshold, now=self.now(),
            highest_versions=st.highest_versions, max_manifest_bytes=self.limits.max_manifest_bytes,
        )
        future = future_reason(body.created, clock=self.clock(), floor=st.time_floor, skew_s=self.max_clock_skew_s)
        if future is not None:
            raise ManifestError("bundle %s v%d refused: %s" % (body.name, body.version, future))
        if expect is not None and (body.name, body.version) != (expect.name, expect.version):
            raise ManifestError(
                "manifest is %s v%d but the command named %s v%d"
                % (body.name, body.version, expect.name, expect.version)
            )
        for path, entry in body.files.items():
            if entry.size > self.limits.max_file_bytes:
                raise ManifestError("file %s of %d bytes is over limits.max_file_bytes %d"
                                    % (path, entry.size, self.limits.max_file_bytes))
        if body.total_size() > self.limits.max_bundle_bytes:
            raise ManifestError("bundle of %d bytes is over limits.max_bundle_bytes %d"
                                % (body.total_size(), self.limits.max_bundle_bytes))
        return body

    # ------------------------------------------------------------------------------------ deploy

    def deploy(self, args: DeployArgs, *, command_seq: Optional[int] = None, resumed: bool = False) -> BundleRecord:
        """Run a deploy command to the end. Raises the step's error after reporting it; the previous
        model keeps serving and `state.json` stays valid."""
        st = self.store.state
        ref = args.bundle
        rid = args.rollout_id
        if st.active is not None and st.active.manifest_sha256 == args.manifest_sha256:
            self.emit("command-accepted", "bundle %s v%d is already active" % (ref.name, ref.version),
                      bundle=ref, rollout_id=rid, command_seq=command_seq, data={"already_active": True})
            if st.pending is not None and st.pending.args.manifest_sha256 == args.manifest_sha256:
                # Resumed after a kill between activation and clearing `pending` (older state files).
                self.store.update_state(pending=None)
            self._state("active", ref, "already active", rid)
            return st.active
        try:
            if not resumed:
                self.store.update_state(pending=PendingDeploy(args=args, command_seq=command_seq))
            return self._deploy(args, command_seq)
        except TransferCancelled:
            raise  # shutting down: keep `pending`, a restarted agent resumes
        except EdgeAgentError as e:
            self._fail(e, ref, rid, command_seq)
            raise
        except OSError as e:
            err = ResourceError("deploy of %s v%d failed: %s" % (ref.name, ref.version, e))
            err.__cause__ = e
            self._fail(err, ref, rid, command_seq)
            raise err

    def _fail(self, e: EdgeAgentError, ref: BundleRef, rid: Optional[str], command_seq: Optional[int]) -> None:
        if isinstance(e, CandidateRefusedError):
            kind = "candidate-refused"
        elif isinstance(e, BundleError):
            kind = "bundle-refused"
        elif isinstance(e, SelfTestError):
            kind = "selftest-failed"
        elif isinstance(e, TransportError):
            kind = "fetch-failed"
        elif isinstance(e, EngineError):
            kind = "engine-build-failed"
        elif isinstance(e, ResourceError):
            kind = "deploy-failed"  # disk full, store quota: the deploy's outcome, which `fleet push --wait` awaits
        else:
            kind = "error"
        log.error("deploy of %s v%d failed: %s", ref.name, ref.version, e)
        if not isinstance(e, TransportError):
            # First free what the failed deploy wrote (a full disk needs that room to record the failure).
            # After a network failure the partial downloads stay: a new deploy command resumes them.
            self.store.gc()
        # Persist first, report second: whoever reacts to the event finds the state already settled.
        try:
            self.store.update_state(pending=None)
            self._state("failed", ref, str(e)[:500], rid)
        except OSError as oe:
            # Disk full even now: state.json is replaced atomically, so the old one is intact and valid;
            # the failure is still reported, and a restart retries the deploy it still lists as pending.
            log.error("cannot record the failed deploy of %s v%d: %s", ref.name, ref.version, oe)
            self.on_state(DeployState(state="failed", bundle=ref, detail=str(e)[:500], rollout_id=rid,
                                      since=self.clock()))
        data = {"error": type(e).__name__}
        if isinstance(e, ResourceError):
            data["reason"] = resource_reason(e)
        self.emit(kind, str(e), level="error", bundle=ref, rollout_id=rid, command_seq=command_seq, data=data)

    def _deploy(self, args: DeployArgs, command_seq: Optional[int]) -> BundleRecord:
        ref = args.bundle
        rid = args.rollout_id
        self._state("fetching", ref, "manifest", rid)
        if args.manifest_size > self.limits.max_manifest_bytes:
            raise ManifestError(
                "manifest of %d bytes for %s v%d is over limits.max_manifest_bytes %d; nothing fetched"
                % (args.manifest_size, ref.name, ref.version, self.limits.max_manifest_bytes)
            )
        if self.store.has_object(args.manifest_sha256):
            raw = self.store.read_object(args.manifest_sha256, self.limits.max_manifest_bytes)
        else:
            if self.fetcher is None:
                raise TransportError("no MQTT transport to fetch %s v%d from" % (ref.name, ref.version))
            raw = self.fetcher.fetch_manifest(ref, args.manifest_sha256, args.manifest_size,
                                              max_bytes=self.limits.max_manifest_bytes)
        if manifest_digest(raw) != args.manifest_sha256:
            raise ManifestError("manifest of %s v%d does not match the command's sha256" % (ref.name, ref.version))
        self._state("verifying", ref, "manifest", rid)
        body = self._verify(raw, ref)
        self.store.add_object_bytes(raw, args.manifest_sha256)
        self.store.update_state(**self.floor_update(body.created, "bundle"))
        missing = self.store.missing_files(body)
        if missing:
            if self.fetcher is None:
                raise TransportError("no MQTT transport to fetch %s v%d from" % (ref.name, ref.version))
            self._state("fetching", ref, "%d file(s)" % len(missing), rid)
            stats = self.fetcher.fetch_files(ref, missing)
            self.last_fetch = stats.as_dict()
            self.emit(
                "fetch-done",
                "fetched %d file(s), %d bytes in %.1f s (%d resumed, %d held already)"
                % (len(missing), stats.bytes_received, stats.elapsed_s, stats.bytes_resumed,
                   body.total_size() - stats.bytes_total),
                bundle=ref, rollout_id=rid, command_seq=command_seq,
                data=dict(stats.as_dict(), bytes_held=body.total_size() - stats.bytes_total),
            )
        return self._install(args.manifest_sha256, body, rid, command_seq, args=args)

    def install_verified(self, manifest_sha256: str, body: ManifestBody, *, rollout_id: Optional[str] = None,
                         command_seq: Optional[int] = None) -> BundleRecord:
        """Steps after the files are in the store (used by side-loading too)."""
        try:
            return self._install(manifest_sha256, body, rollout_id, command_seq)
        except EdgeAgentError as e:
            self._fail(e, BundleRef(name=body.name, version=body.version), rollout_id, command_seq)
            raise

    def _install(self, manifest_sha256: str, body: ManifestBody, rid: Optional[str],
                 command_seq: Optional[int], args: Optional[DeployArgs] = None) -> BundleRecord:
        ref = BundleRef(name=body.name, version=body.version)
        candidate = args is not None and args.mode != "normal" and self.hooks.start_candidate is not None
        self._state("verifying", ref, "files", rid)
        bundle_dir = self.store.materialize(body)
        self.emit("bundle-installed", "bundle %s v%d stored and verified" % (ref.name, ref.version),
                  bundle=ref, rollout_id=rid, command_seq=command_seq,
                  data={"manifest_sha256": manifest_sha256, "bytes": body.total_size()})
        self._state("preparing", ref, "candidate (%s)" % args.mode if candidate and args else None, rid)
        prepare = (self.hooks.prepare_candidate or self.hooks.prepare) if candidate else self.hooks.prepare
        prepared = prepare(bundle_dir, body)
        record = BundleRecord(name=body.name, version=body.version, manifest_sha256=manifest_sha256,
                              installed_at=self.clock())
        try:
            self._state("self-testing", ref, None, rid)
            report = self.hooks.selftest(prepared, bundle_dir, body)
            if not getattr(report, "passed", False):
                raise SelfTestError("golden self-test of %s v%d failed: %s"
                                    % (ref.name, ref.version, getattr(report, "message", "no report")))
            self.emit("selftest-passed", getattr(report, "message", "golden self-test passed"), bundle=ref,
                      rollout_id=rid, command_seq=command_seq, data=dict(getattr(report, "details", {}) or {}))
            if candidate:
                # Shadow / A-B: the candidate runs beside the active bundle; `pending` stays set until
                # it is promoted or refused, so a restarted agent starts the shadow window again.
                assert args is not None and self.hooks.start_candidate is not None
                self.hooks.start_candidate(prepared, bundle_dir, body, args, record)
                return record
            self._state("activating", ref, None, rid)
            self.hooks.activate(prepared, bundle_dir, body)
        except BaseException:
            self.hooks.discard(prepared)
            raise
        # One atomic write: active, nothing pending and (with probation) the probation state. A kill right
        # after activation restarts into probation: never into a stale pending deploy, never "active"
        # without the health gates having run.
        probation = (DeployState(state="probation", bundle=ref, rollout_id=rid, since=self.clock())
                     if self.hooks.probation is not None else None)
        self.store.record_activation(record, deploy=probation, clear_pending=True)
        self.emit("activated", "bundle %s v%d is active" % (ref.name, ref.version), bundle=ref, rollout_id=rid,
                  command_seq=command_seq)
        if probation is not None:
            self.on_state(probation)
            return self.run_probation(record, body, rollout_id=rid, command_seq=command_seq)
        self._state("active", ref, None, rid)
        self.store.gc()
        return record

    def run_probation(self, record: BundleRecord, body: ManifestBody, *, rollout_id: Optional[str] = None,
                      command_seq: Optional[int] = None) -> BundleRecord:
        """Watch the activated bundle's health gates; commit it, or roll back to the previous one.

        Interrupted by a shutdown, nothing is decided: `state.json` keeps saying `probation` and the
        restarted agent runs it again."""
        ref = record.ref
        assert self.hooks.probation is not None
        reason = self.hooks.probation(record, body)
        if reason is not None and self.stopping():
            log.info("probation of %s v%d interrupted by shutdown; it runs again at the next start",
                     ref.name, ref.version)
            return record
        if reason is not None:
            self.emit("probation-failed", reason, level="error", bundle=ref, rollout_id=rollout_id,
                      command_seq=command_seq)
            try:
                return self.rollback(RollbackArgs(reason=reason, rollout_id=rollout_id), command_seq=command_seq,
                                     failed=True)
            except BundleError as e:
                # Nothing to go back to (first bundle on this device): report it; the operator decides.
                self._state("failed", ref, "probation failed and %s" % e, rollout_id)
                return record
        self.emit("probation-passed", "probation of %s v%d passed" % (ref.name, ref.version), bundle=ref,
                  rollout_id=rollout_id, command_seq=command_seq)
        self._state("active", ref, None, rollout_id)
        self.store.gc()
        return record

    # ------------------------------------------------------------------------------------ rollback

    def rollback(self, args: RollbackArgs, *, command_seq: Optional[int] = None, failed: bool = False) -> BundleRecord:
        """Activate the previous bundle (or the named version, when the store still holds it)."""
        st = self.store.state
        rid = args.rollout_id
        target = st.previous
        if args.to is not None:
            target = None
            for r in (st.previous, st.active):
                if r is not None and (r.name, r.version) == (args.to.name, args.to.version):
                    target = r
        if target is None:
            err = BundleError("no bundle to roll back to%s" % (
                "" if args.to is None else " (%s v%d is not held)" % (args.to.name, args.to.version)))
            self.emit("rollback-failed", str(err), level="error", rollout_id=rid, command_seq=command_seq)
            raise err
        if st.active is not None and target.manifest_sha256 == st.active.manifest_sha256:
            self.emit("rolled-back", "bundle %s v%d is already active" % (target.name, target.version),
                      bundle=target.ref, rollout_id=rid, command_seq=command_seq)
            return target
        try:
            body = self.store.load_manifest(target.manifest_sha256)
            self._state("preparing", target.ref, "rollback", rid)
            bundle_dir = self.store.materialize(body)
            prepared = self.hooks.prepare(bundle_dir, body)
            try:
                report = self.hooks.selftest(prepared, bundle_dir, body)
                if not getattr(report, "passed", False):
                    raise SelfTestError("rollback target %s v%d fails its self-test: %s"
                                        % (target.name, target.version, getattr(report, "message", "")))
                self.hooks.activate(prepared, bundle_dir, body)
            except BaseException:
                self.hooks.discard(prepared)
                raise
        except EdgeAgentError as e:
            self.emit("rollback-failed", str(e), level="error", bundle=target.ref, rollout_id=rid,
                      command_seq=command_seq)
            self._state("failed", target.ref, str(e)[:500], rid)
            raise
        old = st.active
        self.store.update_state(active=target, previous=old, pending=None)
        self.emit("rolled-back", "rolled back to %s v%d%s" % (target.name, target.version,
                                                              (": " + args.reason) if args.reason else ""),
                  level="warning" if failed else "info", bundle=target.ref, rollout_id=rid, command_seq=command_seq,
                  data={"from": old.ref.model_dump() if old else None, "reason": args.reason})
        self._state("rolled-back" if failed else "active", target.ref, args.reason or None, rid)
        return target

    # ------------------------------------------------------------------------------------ side-load

    def install_file(self, path: Path, *, max_bundle_bytes: int) -> BundleRecord:
        """Side-load a bundle archive through the same verify/store path as an MQTT deploy.

        A refused bundle changes nothing on disk: objects, partial files and bundle trees it added are
        removed and `state.json` (time floor, versions, deploy state) gets its old bytes back."""
        snap = self.store.snapshot()
        try:
            return self._install_file(path, max_bundle_bytes=max_bundle_bytes)
        except BaseException:
            if self.store.state.active == snap.state.active:  # refused before it became active
                self.store.restore(snap)
            raise

    def _install_file(self, path: Path, *, max_bundle_bytes: int) -> BundleRecord:
        from edge_agent.bundle.archive import read_bundle

        raw, reader = read_bundle(Path(path), max_manifest_bytes=self.limits.max_manifest_bytes,
                                  max_bundle_bytes=max_bundle_bytes)
        with reader:
            body = self._verify(raw, None)
            ref = BundleRef(name=body.name, version=body.version)
            msha = manifest_digest(raw)
            names = {m.name for m in reader.files()}
            lacking = sorted(set(body.files) - names)
            if lacking:
                raise BundleError("bundle %s lacks file(s) its manifest lists: %s" % (path, ", ".join(lacking)))
            unlisted = sorted(names - set(body.files))
            if unlisted:
                raise ArchiveError("bundle %s has file(s) its manifest does not list: %s"
                                   % (Path(path).name, ", ".join(unlisted[:5])))
            self.store.check_quota(sum(size for _, size in self.store.missing_files(body).values()))
            self.store.add_object_bytes(raw, msha)
            self.store.update_state(**self.floor_update(body.created, "bundle"))
            for sha, (member, size) in self.store.missing_files(body).items():
                part = self.store.partial_path(sha)
                try:
                    with open(part, "wb") as f:
                        for block in reader.iter_chunks(member):
                            f.write(block)
                        f.flush()
                        os.fsync(f.fileno())
                    self.store.add_object_file(part, sha, size)
                except BundleError:
                    self.store.drop_partial(sha)
                    raise
                except OSError as e:  # disk full, file too large...: one line, no half-written file left
                    self.store.drop_partial(sha)
                    raise ResourceError("cannot copy %s of %s into the store %s: %s"
                                        % (member, Path(path).name, self.store.root, e.strerror or e))
        self.emit("command-accepted", "side-loading %s v%d from %s" % (ref.name, ref.version, Path(path).name),
                  bundle=ref)
        return self.install_verified(msha, body)
