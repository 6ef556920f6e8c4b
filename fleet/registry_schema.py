"""The registry's schema, as numbered migrations written once for SQLite and PostgreSQL.

Tables:

* ``devices``: one row per device id: platform, agent version, active/previous bundle, deploy state,
  online flag, last seen, health, the last telemetry summary.
* ``rollouts`` + ``rollout_devices``: the state of every rollout and of each of its devices, enough
  to resume after a controller restart.
* ``rollout_history``: an append-only log of what happened in each rollout.
* (2) what several controllers share: ``command_seq`` (per-device command sequence numbers),
  ``rollout_leases`` and ``rollout_inbox`` (which controller owns a rollout; events and operator
  requests for it), ``telemetry_history`` (downsampled), ``bundle_records`` / ``bundle_objects`` /
  ``bundle_chunks`` (the shared bundle store).
* (3) ``controllers``: the controllers sharing the registry, their last heartbeat and counters.
* (4) ``fetch_entitlements``: which device may fetch which bundle (a deploy command was sent to it).
* (5) per-device telemetry accounting columns of ``devices``.
* (6) ``rollout_claims``: which rollout may command each device (one row per device, so two rollouts
  started at once on two controllers cannot both take a device).

The registry itself (`fleet.registry`) applies the missing migrations when it opens a database.
"""

from __future__ import annotations

from typing import Tuple

#: Migrations in order; the index + 1 is the schema version. Written once for both engines (see
#: fleet/registry_db.py for the ``{float}``-style type names); never edit one that has shipped, add one.
MIGRATIONS: Tuple[str, ...] = (
    """
    CREATE TABLE devices (
        device_id       TEXT PRIMARY KEY,
        first_seen      {float} NOT NULL,
        last_seen       {float} NOT NULL,
        online          INTEGER NOT NULL DEFAULT 0,
        status_ts       {float},
        agent_version   TEXT,
        platform        TEXT,
        active_name     TEXT,
        active_version  INTEGER,
        previous        TEXT,
        deploy_state    TEXT,
        deploy          TEXT,
        ready           INTEGER NOT NULL DEFAULT 0,
        health          TEXT NOT NULL DEFAULT 'unknown',
        telemetry_ts    {float},
        telemetry       TEXT,
        last_event      TEXT
    );
    CREATE TABLE rollouts (
        rollout_id     TEXT PRIMARY KEY,
        bundle_name    TEXT NOT NULL,
        bundle_version INTEGER NOT NULL,
        mode           TEXT NOT NULL,
        state          TEXT NOT NULL,
        created        {float} NOT NULL,
        updated        {float} NOT NULL,
        reason         TEXT NOT NULL DEFAULT '',
        body           TEXT NOT NULL
    );
    CREATE INDEX rollouts_state ON rollouts(state);
    CREATE TABLE rollout_devices (
        rollout_id TEXT NOT NULL REFERENCES rollouts(rollout_id) ON DELETE CASCADE,
        device_id  TEXT NOT NULL,
        wave       INTEGER NOT NULL,
        state      TEXT NOT NULL,
        prior      TEXT,
        sent_at    {float},
        updated    {float} NOT NULL,
        detail     TEXT NOT NULL DEFAULT '',
        rollback_attempts INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (rollout_id, device_id)
    );
    CREATE INDEX rollout_devices_device ON rollout_devices(device_id);
    CREATE TABLE rollout_history (
        id         {autoid},
        rollout_id TEXT NOT NULL,
        ts         {float} NOT NULL,
        kind       TEXT NOT NULL,
        device_id  TEXT,
        message    TEXT NOT NULL
    );
    CREATE INDEX rollout_history_rollout ON rollout_history(rollout_id, id);
    """,
    # 2: what several controllers share: command sequence numbers, rollout leases and the inbox of
    # events / operator requests for a rollout another controller owns, downsampled telemetry history,
    # and the bundle store (records + objects in chunks).
    """
    CREATE TABLE command_seq (
        device_id TEXT PRIMARY KEY,
        last_seq  {bigint} NOT NULL
    );
    CREATE TABLE rollout_leases (
        rollout_id TEXT PRIMARY KEY,
        owner      TEXT NOT NULL,
        expires_at {float} NOT NULL,
        epoch      {bigint} NOT NULL DEFAULT 1
    );
    CREATE TABLE rollout_inbox (
        id         {autoid},
        rollout_id TEXT NOT NULL,
        kind       TEXT NOT NULL,
        body       TEXT NOT NULL,
        created    {float} NOT NULL,
        done       INTEGER NOT NULL DEFAULT 0,
        result     TEXT
    );
    CREATE INDEX rollout_inbox_rollout ON rollout_inbox(rollout_id, done, id);
    CREATE TABLE telemetry_history (
        device_id TEXT NOT NULL,
        bucket    {bigint} NOT NULL,
        ts        {float} NOT NULL,
        summary   TEXT NOT NULL,
        PRIMARY KEY (device_id, bucket)
    );
    CREATE INDEX telemetry_history_bucket ON telemetry_history(bucket);
    CREATE TABLE bundle_records (
        name            TEXT NOT NULL,
        version         INTEGER NOT NULL,
        manifest_sha256 TEXT NOT NULL,
        manifest_size   {bigint} NOT NULL,
        created         {float} NOT NULL,
        PRIMARY KEY (name, version)
    );
    CREATE TABLE bundle_objects (
        sha256      TEXT PRIMARY KEY,
        size        {bigint} NOT NULL,
        chunk_bytes INTEGER NOT NULL,
        complete    INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE bundle_chunks (
        sha256 TEXT NOT NULL,
        idx    INTEGER NOT NULL,
        data   {blob} NOT NULL,
        PRIMARY KEY (sha256, idx)
    );
    """,
    # 3: the controllers sharing the registry, each with its last heartbeat and counters.
    """
    CREATE TABLE controllers (
        owner      TEXT PRIMARY KEY,
        client_id  TEXT NOT NULL,
        started    {float} NOT NULL,
        heartbeat  {float} NOT NULL,
        stats      TEXT NOT NULL
    );
    """,
    # 4: which device may fetch which bundle: granted when a deploy command for it is sent, read by
    # whichever controller answers the device's fetch requests (fleet/entitlements.py).
    """
    CREATE TABLE fetch_entitlements (
        device_id  TEXT NOT NULL,
        name       TEXT NOT NULL,
        version    INTEGER NOT NULL,
        granted_at {float} NOT NULL,
        PRIMARY KEY (device_id, name, version)
    );
    """,
    # 5: telemetry accounting per device run (boot time = ts - uptime): the lowest and highest sequence
    # number seen and how many messages arrived (summed over controllers), and what earlier runs lost.
    """
    ALTER TABLE devices ADD COLUMN tel_boot {float};
    ALTER TABLE devices ADD COLUMN tel_seq_min {bigint};
    ALTER TABLE devices ADD COLUMN tel_seq_max {bigint};
    ALTER TABLE devices ADD COLUMN tel_received {bigint};
    ALTER TABLE devices ADD COLUMN tel_lost_prior {bigint} NOT NULL DEFAULT 0;
    """,
    # 6: the rollout that may command each device. Written in the transaction that creates the rollout
    # (the device's primary key refuses a second rollout, whichever controller starts it), removed when
    # the rollout can send nothing more. Rollouts running when this migration is applied take theirs.
    """
    CREATE TABLE rollout_claims (
        device_id  TEXT PRIMARY KEY,
        rollout_id TEXT NOT NULL,
        claimed_at {float} NOT NULL
    );
    CREATE INDEX rollout_claims_rollout ON rollout_claims(rollout_id);
    INSERT INTO rollout_claims (device_id, rollout_id, claimed_at)
        SELECT d.device_id, d.rollout_id, r.created FROM rollout_devices d
        JOIN rollouts r ON r.rollout_id = d.rollout_id
        WHERE r.state IN ('running', 'paused', 'stalled') OR (r.state IN ('halted', 'aborted')
            AND EXISTS (SELECT 1 FROM rollout_devices o WHERE o.rollout_id = r.rollout_id
                        AND o.state = 'rollback-sent'))
        ORDER BY r.created DESC
        ON CONFLICT (device_id) DO NOTHING;
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)
