//! [`LogStorage`]: raft-rs `Storage` over a [`tern_log::Log`] plus two small files.
//!
//! Files in the group directory:
//! - `log/`: the segmented log; every Raft entry is written here exactly once.
//! - `state`: HardState + ConfState (protobuf), replaced atomically. Rewritten only
//!   when term, vote or the configuration change: those must be durable before any
//!   message that depends on them leaves the node. The commit index is persisted
//!   lazily with them: a stale commit index is safe (Raft re-establishes it), and it
//!   never points past entries that were already synced when it was recorded.
//! - `snapshot`: the latest state-machine snapshot with its Raft metadata.
//!
//! - `snapshot-entries`: after a snapshot was *installed* from a leader, the entries at
//!   or below its index that still hold payloads of unsettled messages (they came with
//!   the snapshot; this replica's log starts after it). Written before `snapshot`, and
//!   used only when its index matches the snapshot's.
//!
//! - `repairing`: present while this replica rebuilds from its peers after damage to its
//!   log or snapshot was found (see [`LogStorage::open`]); holds the commit index
//!   the replica had before. `quarantine/` keeps the damaged files for study.
//!
//! Raft's view of the log starts after the snapshot (`first_index = snapshot + 1`),
//! while the physical log may keep older segments: they still hold payloads of
//! unsettled messages, which the snapshot references by location instead of copying.
//! A snapshot sent to a follower therefore carries those entries with it (bounded by
//! [`MAX_SNAPSHOT_SEND_BYTES`]).

use crate::ReplicationError;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use raft::eraftpb::{ConfState, Entry, EntryType, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};
use std::path::{Path, PathBuf};
use tern_log::{Log, LogOptions};

const STATE_FILE: &str = "state";
const SNAPSHOT_FILE: &str = "snapshot";
const SNAPSHOT_ENTRIES_FILE: &str = "snapshot-entries";
const LOG_DIR: &str = "log";
const REPAIR_FILE: &str = "repairing";
const QUARANTINE_DIR: &str = "quarantine";
/// Largest snapshot (state plus payload entries) sent to a follower: it travels as one
/// Raft message, under the peer transport's 64 MiB message bound.
pub const MAX_SNAPSHOT_SEND_BYTES: usize = 48 * 1024 * 1024;

/// The latest snapshot of a group: Raft metadata plus opaque state-machine bytes.
#[derive(Clone, Debug, Default)]
pub struct SnapshotFile {
    pub index: u64,
    pub term: u64,
    pub conf_state: ConfState,
    pub data: Bytes,
}

pub struct LogStorage {
    dir: PathBuf,
    log: Log,
    hard_state: HardState,
    conf_state: ConfState,
    snapshot: SnapshotFile,
    /// Entries at or below the snapshot index that came with an installed snapshot.
    embedded: Vec<tern_log::Entry>,
    durable: bool,
    /// Term/vote/conf as last written to `state`; used to skip rewrites.
    persisted: (u64, u64, ConfState),
    /// Set while rebuilding from peers: the commit index known before the damage.
    repair: Option<u64>,
}

impl LogStorage {
    /// Opens or creates the storage in `dir`. `bootstrap_voters` is used only when
    /// the group has no state yet (a brand-new group).
    ///
    /// Damage (a bit flip, a torn synced write: anything recovery calls corruption) in
    /// the log or snapshot files of a durable replica that has peers is repaired from
    /// them: the damaged files move to `quarantine/`, the replica restarts empty with
    /// its term and vote, and stays *repairing* (see [`LogStorage::repairing`]) until
    /// a leader has brought it up to date. A lone replica, a damaged `state` file or a
    /// transient queue's replica keep the error: there is nothing to repair from, or
    /// no safe way to (the vote would be lost).
    pub fn open(
        dir: &Path,
        log_options: LogOptions,
        bootstrap_voters: &[u64],
        durable: bool,
    ) -> Result<LogStorage, ReplicationError> {
        let marker = read_repair_marker(dir)?;
        let err = match Self::open_files(dir, log_options.clone(), bootstrap_voters, durable) {
            Ok(mut storage) => {
                storage.repair = marker;
                return Ok(storage);
            }
            Err(e) if durable && is_repairable(dir, &e) => e,
            Err(e) => return Err(e),
        };
        let Some((mut hs, cs)) = read_state(&dir.join(STATE_FILE))? else {
            return Err(err);
        };
        if cs.voters.len() + cs.learners.len() < 2 {
            return Err(err);
        }
        let known_commit = hs.commit.max(marker.unwrap_or(0));
        tracing::error!(dir = %dir.display(), error = %err, known_commit, "damaged replica: its log and snapshot move to quarantine/, it rebuilds from its peers and does not vote until then");
        quarantine(dir)?;
        tern_log::write_atomic(&dir.join(REPAIR_FILE), &known_commit.to_be_bytes())?;
        // Term and vote stay (a vote must never be cast twice in a term); the commit
        // index restarts at 0, since nothing is left that it could point at.
        hs.commit = 0;
        write_state_file(dir, &hs, &cs)?;
        let mut storage = Self::open_files(dir, log_options, bootstrap_voters, durable)?;
        storage.repair = Some(known_commit);
        Ok(storage)
    }

    fn open_files(
        dir: &Path,
        log_options: LogOptions,
        bootstrap_voters: &[u64],
        durable: bool,
    ) -> Result<LogStorage, ReplicationError> {
        let (mut log, report) = Log::open(&dir.join(LOG_DIR), log_options)?;
        if let Some((path, offset)) = &report.torn_tail {
            tracing::warn!(path = %path.display(), offset, "truncated a torn log tail on recovery");
        }
        let snapshot = read_snapshot(&dir.join(SNAPSHOT_FILE))?.unwrap_or_default();
        let embedded = read_embedded(&dir.join(SNAPSHOT_ENTRIES_FILE), snapshot.index)?;
        if let Some(embedded) = &embedded {
            // An installed snapshot: everything up to its index is in the snapshot files.
            // A crash during the install may have left the old log behind: drop it.
            if log.last_index() < snapshot.index || log.first_index() > snapshot.index + 1 {
                log.reset(snapshot.index + 1)?;
            }
            tracing::debug!(entries = embedded.len(), "snapshot entries loaded");
        }
        let embedded = embedded.unwrap_or_default();
        let (mut hard_state, conf_state) = match read_state(&dir.join(STATE_FILE))? {
            Some(state) => state,
            None => {
                let cs = ConfState {
                    voters: bootstrap_voters.to_vec(),
                    ..Default::default()
                };
                (HardState::default(), cs)
            }
        };
        // The commit index may be stale, never ahead of what the log holds: everything up
        // to the recorded commit and the snapshot was synced. A log that ends earlier lost
        // durable records (e.g. damage to its last synced record): refuse to serve it.
        let durable_index = hard_state.commit.max(snapshot.index);
        if log.last_index() < durable_index {
            let torn = report
                .torn_tail
                .as_ref()
                .map(|(p, o)| format!(" (recovery cut {} at byte offset {o})", p.display()));
            return Err(ReplicationError::CorruptState {
                path: dir.join(LOG_DIR),
                reason: format!(
                    "the log ends at index {} but index {durable_index} was durable{}: refusing to serve a log that lost acknowledged records",
                    log.last_index(),
                    torn.unwrap_or_default()
                ),
            });
        }
        hard_state.commit = durable_index;
        let persisted = (hard_state.term, hard_state.vote, conf_state.clone());
        let mut storage = LogStorage {
            dir: dir.to_path_buf(),
            log,
            hard_state,
            conf_state,
            snapshot,
            embedded,
            durable,
            persisted,
            repair: None,
        };
        storage.write_state()?;
        Ok(storage)
    }

    /// While this replica rebuilds from its peers after damage: the commit index it
    /// knew before. A repairing replica must not vote or campaign (what it lost may be
    /// needed for a quorum's intersection), see [`crate::Group`].
    pub fn repairing(&self) -> Option<u64> {
        self.repair
    }

    /// Starts repairing at run time: this replica learned it lost entries it had
    /// acknowledged (see [`crate::Group`]). Durable before it answers anyone again.
    pub fn begin_repair(&mut self, known_commit: u64) -> Result<(), ReplicationError> {
        tern_log::write_atomic(&self.dir.join(REPAIR_FILE), &known_commit.to_be_bytes())?;
        self.repair = Some(known_commit);
        Ok(())
    }

    /// The replica is up to date again: it may vote from now on.
    pub fn finish_repair(&mut self) -> Result<(), ReplicationError> {
        let path = self.dir.join(REPAIR_FILE);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_failure(&path, e)),
        }
        sync_dir(&self.dir)?;
        self.repair = None;
        Ok(())
    }

    /// The last index this replica has persisted (log or snapshot).
    pub fn persisted_last_index(&self) -> u64 {
        self.raft_last_index()
    }

    pub fn log(&self) -> &Log {
        &self.log
    }

    pub fn snapshot_file(&self) -> &SnapshotFile {
        &self.snapshot
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    /// Writes entries to the log (not yet synced).
    pub fn append(&mut self, entries: &[Entry]) -> Result<(), ReplicationError> {
        if entries.is_empty() {
            return Ok(());
        }
        let converted: Vec<tern_log::Entry> = entries.iter().map(to_log_entry).collect();
        self.log.append(&converted)?;
        Ok(())
    }

    /// fdatasync the log (durable groups only). An error is fatal for the node.
    pub fn sync(&mut self) -> Result<(), ReplicationError> {
        if self.durable {
            self.log.sync()?;
        }
        Ok(())
    }

    /// Records a new hard state; rewrites the state file only if term or vote changed.
    pub fn set_hard_state(&mut self, hs: &HardState) -> Result<(), ReplicationError> {
        self.hard_state = hs.clone();
        if (hs.term, hs.vote) != (self.persisted.0, self.persisted.1) {
            self.write_state()?;
        }
        Ok(())
    }

    pub fn set_commit(&mut self, commit: u64) {
        debug_assert!(commit >= self.hard_state.commit);
        self.hard_state.commit = commit;
    }

    pub fn set_conf_state(&mut self, cs: ConfState) -> Result<(), ReplicationError> {
        self.conf_state = cs;
        self.write_state()
    }

    /// Saves a state-machine snapshot taken at `index` (which must be applied), moves
    /// Raft's first index past it and releases log segments that hold nothing below
    /// `keep_from` (the oldest location still referenced by an unsettled message).
    pub fn compact(
        &mut self,
        index: u64,
        data: Bytes,
        keep_from: u64,
    ) -> Result<u64, ReplicationError> {
        assert!(
            index <= self.hard_state.commit,
            "compacting past the commit index"
        );
        let term = self.term_of(index)?;
        let snapshot = SnapshotFile {
            index,
            term,
            conf_state: self.conf_state.clone(),
            data,
        };
        // Entries that came with an installed snapshot stay while still referenced.
        let embedded: Vec<tern_log::Entry> = self
            .embedded
            .iter()
            .filter(|e| e.index >= keep_from)
            .cloned()
            .collect();
        self.write_embedded(index, &embedded)?;
        tern_log::write_atomic(&self.dir.join(SNAPSHOT_FILE), &encode_snapshot(&snapshot)?)?;
        self.snapshot = snapshot;
        self.embedded = embedded;
        // The state file carries the commit index; record it now that it is known durable.
        self.write_state()?;
        let released = self.log.release_before(keep_from.min(index + 1))?;
        Ok(released)
    }

    /// Reads an entry's data (for PUSHing payloads), from cache or disk.
    pub fn entry_data(&self, index: u64) -> Result<Bytes, ReplicationError> {
        if index <= self.snapshot.index {
            if let Ok(i) = self.embedded.binary_search_by_key(&index, |e| e.index) {
                return Ok(self.embedded[i].data.clone());
            }
        }
        Ok(self.log.entry(index)?.data)
    }

    /// The snapshot as sent to a follower: state bytes plus every entry at or below
    /// the snapshot index still present here (they hold unsettled payloads).
    fn snapshot_blob(&self) -> Result<Bytes, ReplicationError> {
        let mut entries: Vec<tern_log::Entry> = self.embedded.clone();
        let from = self
            .log
            .first_index()
            .max(entries.last().map_or(1, |e| e.index + 1));
        if from <= self.snapshot.index && self.log.last_index() >= from {
            entries.extend(self.log.entries(from, self.snapshot.index + 1, None)?);
        }
        let mut b = BytesMut::new();
        b.put_u32(self.snapshot.data.len() as u32);
        b.put_slice(&self.snapshot.data);
        put_entries(&mut b, &entries);
        Ok(b.freeze())
    }

    /// Installs a leader's snapshot: its entries and state become this replica's, the
    /// log restarts after it. Crash-safe order: entries file, snapshot file, log reset.
    /// Returns the state-machine bytes to restore from.
    pub fn install_snapshot(&mut self, snap: &Snapshot) -> Result<Bytes, ReplicationError> {
        let meta = snap.get_metadata();
        let mut blob = snap.data.clone();
        let bad = |reason: &str| ReplicationError::CorruptState {
            path: self.dir.join(SNAPSHOT_FILE),
            reason: format!("snapshot from the leader: {reason}"),
        };
        if blob.remaining() < 4 {
            return Err(bad("truncated"));
        }
        let len = blob.get_u32() as usize;
        if blob.remaining() < len {
            return Err(bad("truncated state"));
        }
        let data = blob.split_to(len);
        let entries = take_entries(&mut blob).ok_or_else(|| bad("bad entries"))?;
        self.write_embedded(meta.index, &entries)?;
        let snapshot = SnapshotFile {
            index: meta.index,
            term: meta.term,
            conf_state: meta.get_conf_state().clone(),
            data: data.clone(),
        };
        tern_log::write_atomic(&self.dir.join(SNAPSHOT_FILE), &encode_snapshot(&snapshot)?)?;
        self.log.reset(meta.index + 1)?;
        self.snapshot = snapshot;
        self.embedded = entries;
        self.conf_state = meta.get_conf_state().clone();
        self.hard_state.commit = self.hard_state.commit.max(meta.index);
        self.write_state()?;
        Ok(data)
    }

    fn write_embedded(
        &self,
        index: u64,
        entries: &[tern_log::Entry],
    ) -> Result<(), ReplicationError> {
        let path = self.dir.join(SNAPSHOT_ENTRIES_FILE);
        if entries.is_empty() {
            return match std::fs::remove_file(&path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(ReplicationError::CorruptState {
                    path,
                    reason: format!("cannot remove: {e}"),
                }),
            };
        }
        let mut b = BytesMut::new();
        b.put_u64(index);
        put_entries(&mut b, entries);
        tern_log::write_atomic(&path, &b)?;
        Ok(())
    }

    fn raft_first_index(&self) -> u64 {
        self.snapshot.index + 1
    }

    fn raft_last_index(&self) -> u64 {
        self.log.last_index().max(self.snapshot.index)
    }

    fn term_of(&self, index: u64) -> Result<u64, ReplicationError> {
        if index == self.snapshot.index {
            return Ok(self.snapshot.term);
        }
        Ok(self.log.term(index)?)
    }

    fn write_state(&mut self) -> Result<(), ReplicationError> {
        write_state_file(&self.dir, &self.hard_state, &self.conf_state)?;
        self.persisted = (
            self.hard_state.term,
            self.hard_state.vote,
            self.conf_state.clone(),
        );
        Ok(())
    }
}

impl raft::Storage for LogStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.raft_first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.raft_last_index() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let entries = self
            .log
            .entries(low, high, max_size.into())
            .map_err(|e| raft::Error::Store(StorageError::Other(Box::new(e))))?;
        Ok(entries.into_iter().map(from_log_entry).collect())
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.snapshot.index {
            return Ok(self.snapshot.term);
        }
        if idx < self.raft_first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.raft_last_index() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        self.log
            .term(idx)
            .map_err(|e| raft::Error::Store(StorageError::Other(Box::new(e))))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.raft_first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.raft_last_index())
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        if self.snapshot.index < request_index || self.snapshot.index == 0 {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        let blob = self
            .snapshot_blob()
            .map_err(|e| raft::Error::Store(StorageError::Other(Box::new(e))))?;
        if blob.len() > MAX_SNAPSHOT_SEND_BYTES {
            tracing::warn!(
                to,
                bytes = blob.len(),
                max = MAX_SNAPSHOT_SEND_BYTES,
                "snapshot with its unsettled payloads is too large to send; the follower stays behind"
            );
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        let mut snap = Snapshot::default();
        let mut meta = SnapshotMetadata {
            index: self.snapshot.index,
            term: self.snapshot.term,
            ..Default::default()
        };
        meta.set_conf_state(self.snapshot.conf_state.clone());
        snap.set_metadata(meta);
        snap.data = blob;
        Ok(snap)
    }
}

fn to_log_entry(e: &Entry) -> tern_log::Entry {
    tern_log::Entry {
        index: e.index,
        term: e.term,
        kind: e.entry_type as u8,
        context: e.context.clone(),
        data: e.data.clone(),
    }
}

fn from_log_entry(e: tern_log::Entry) -> Entry {
    let entry_type = match e.kind {
        1 => EntryType::EntryConfChange,
        2 => EntryType::EntryConfChangeV2,
        _ => EntryType::EntryNormal,
    };
    Entry {
        index: e.index,
        term: e.term,
        entry_type,
        context: e.context,
        data: e.data,
        ..Default::default()
    }
}

fn put_message(buf: &mut BytesMut, m: &dyn protobuf::Message) -> Result<(), ReplicationError> {
    let bytes = m
        .write_to_bytes()
        .map_err(|e| ReplicationError::CorruptState {
            path: PathBuf::new(),
            reason: format!("encode: {e}"),
        })?;
    buf.put_u32(bytes.len() as u32);
    buf.put_slice(&bytes);
    Ok(())
}

fn take_message<M: protobuf::Message>(buf: &mut Bytes, path: &Path) -> Result<M, ReplicationError> {
    let corrupt = |reason: String| ReplicationError::CorruptState {
        path: path.to_path_buf(),
        reason,
    };
    if buf.remaining() < 4 {
        return Err(corrupt("truncated length".into()));
    }
    let len = buf.get_u32() as usize;
    if buf.remaining() < len {
        return Err(corrupt("truncated message".into()));
    }
    let body = buf.split_to(len);
    M::parse_from_bytes(&body).map_err(|e| corrupt(format!("decode: {e}")))
}

fn write_state_file(dir: &Path, hs: &HardState, cs: &ConfState) -> Result<(), ReplicationError> {
    let mut buf = BytesMut::new();
    put_message(&mut buf, hs)?;
    put_message(&mut buf, cs)?;
    tern_log::write_atomic(&dir.join(STATE_FILE), &buf)?;
    Ok(())
}

/// Damage recovery can repair from peers: anything but the `state` file (term and vote).
fn is_repairable(dir: &Path, e: &ReplicationError) -> bool {
    let path = match e {
        ReplicationError::Log(tern_log::LogError::Corrupt { path, .. }) => path,
        ReplicationError::CorruptState { path, .. } => path,
        _ => return false,
    };
    path != &dir.join(STATE_FILE)
}

fn io_failure(path: &Path, e: std::io::Error) -> ReplicationError {
    ReplicationError::CorruptState {
        path: path.to_path_buf(),
        reason: format!("I/O error: {e}"),
    }
}

fn sync_dir(dir: &Path) -> Result<(), ReplicationError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_failure(dir, e))
}

/// Moves the damaged log and snapshot files into `quarantine/` (replacing an older
/// quarantine: one set of damaged files per group is kept, bounding the disk it takes).
fn quarantine(dir: &Path) -> Result<(), ReplicationError> {
    let q = dir.join(QUARANTINE_DIR);
    match std::fs::remove_dir_all(&q) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_failure(&q, e)),
    }
    std::fs::create_dir(&q).map_err(|e| io_failure(&q, e))?;
    for name in [LOG_DIR, SNAPSHOT_FILE, SNAPSHOT_ENTRIES_FILE] {
        match std::fs::rename(dir.join(name), q.join(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_failure(&dir.join(name), e)),
        }
    }
    sync_dir(&q)?;
    sync_dir(dir)
}

fn read_repair_marker(dir: &Path) -> Result<Option<u64>, ReplicationError> {
    let path = dir.join(REPAIR_FILE);
    let Some(bytes) = tern_log::read_checked(&path)? else {
        return Ok(None);
    };
    let raw: [u8; 8] = bytes[..]
        .try_into()
        .map_err(|_| ReplicationError::CorruptState {
            path,
            reason: "repair marker is not 8 bytes".into(),
        })?;
    Ok(Some(u64::from_be_bytes(raw)))
}

fn read_state(path: &Path) -> Result<Option<(HardState, ConfState)>, ReplicationError> {
    let Some(mut bytes) = tern_log::read_checked(path)? else {
        return Ok(None);
    };
    let hs = take_message::<HardState>(&mut bytes, path)?;
    let cs = take_message::<ConfState>(&mut bytes, path)?;
    Ok(Some((hs, cs)))
}

fn put_entries(b: &mut BytesMut, entries: &[tern_log::Entry]) {
    b.put_u32(entries.len() as u32);
    for e in entries {
        b.put_u64(e.index);
        b.put_u64(e.term);
        b.put_u8(e.kind);
        b.put_u32(e.context.len() as u32);
        b.put_slice(&e.context);
        b.put_u32(e.data.len() as u32);
        b.put_slice(&e.data);
    }
}

/// Decodes entries; None on malformed input (never panics, never over-allocates).
fn take_entries(b: &mut Bytes) -> Option<Vec<tern_log::Entry>> {
    if b.remaining() < 4 {
        return None;
    }
    let n = b.get_u32() as usize;
    if n.saturating_mul(25) > b.remaining() {
        return None;
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        if b.remaining() < 21 {
            return None;
        }
        let index = b.get_u64();
        let term = b.get_u64();
        let kind = b.get_u8();
        let clen = b.get_u32() as usize;
        if b.remaining() < clen + 4 {
            return None;
        }
        let context = b.split_to(clen);
        let dlen = b.get_u32() as usize;
        if b.remaining() < dlen {
            return None;
        }
        let data = b.split_to(dlen);
        out.push(tern_log::Entry {
            index,
            term,
            kind,
            context,
            data,
        });
    }
    let ordered = out.windows(2).all(|w| w[0].index < w[1].index);
    (ordered && !b.has_remaining()).then_some(out)
}

/// The entries that came with the installed snapshot at `snapshot_index`, if the file
/// belongs to it (a file left by an interrupted install or an older snapshot is ignored).
fn read_embedded(
    path: &Path,
    snapshot_index: u64,
) -> Result<Option<Vec<tern_log::Entry>>, ReplicationError> {
    let Some(mut bytes) = tern_log::read_checked(path)? else {
        return Ok(None);
    };
    if bytes.remaining() < 8 || bytes.get_u64() != snapshot_index {
        return Ok(None);
    }
    let entries = take_entries(&mut bytes).ok_or_else(|| ReplicationError::CorruptState {
        path: path.to_path_buf(),
        reason: "malformed snapshot entries".into(),
    })?;
    Ok(Some(entries))
}

fn encode_snapshot(s: &SnapshotFile) -> Result<BytesMut, ReplicationError> {
    let mut buf = BytesMut::with_capacity(s.data.len() + 64);
    buf.put_u64(s.index);
    buf.put_u64(s.term);
    put_message(&mut buf, &s.conf_state)?;
    buf.put_slice(&s.data);
    Ok(buf)
}

fn read_snapshot(path: &Path) -> Result<Option<SnapshotFile>, ReplicationError> {
    let Some(mut bytes) = tern_log::read_checked(path)? else {
        return Ok(None);
    };
    if bytes.remaining() < 16 {
        return Err(ReplicationError::CorruptState {
            path: path.to_path_buf(),
            reason: "truncated header".into(),
        });
    }
    let index = bytes.get_u64();
    let term = bytes.get_u64();
    let conf_state = take_message::<ConfState>(&mut bytes, path)?;
    Ok(Some(SnapshotFile {
        index,
        term,
        conf_state,
        data: bytes,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const VOTERS: [u64; 3] = [1, 2, 3];

    /// A durable replica with 50 synced entries of term 3, having voted for 2 and
    /// known entries up to 40 committed.
    fn filled(dir: &Path, voters: &[u64]) {
        let mut s = LogStorage::open(dir, LogOptions::default(), voters, true).expect("open");
        let hs = HardState {
            term: 3,
            vote: 2,
            ..Default::default()
        };
        s.set_hard_state(&hs).expect("hard state");
        let entries: Vec<Entry> = (1..=50)
            .map(|index| Entry {
                index,
                term: 3,
                data: vec![7u8; 300].into(),
                ..Default::default()
            })
            .collect();
        s.append(&entries).expect("append");
        s.sync().expect("sync");
        s.set_commit(40);
        let cs = ConfState {
            voters: voters.to_vec(),
            ..Default::default()
        };
        s.set_conf_state(cs).expect("state file");
    }

    fn flip_a_bit_mid_segment(dir: &Path) {
        let seg = std::fs::read_dir(dir.join(LOG_DIR))
            .expect("log dir")
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "log"))
            .expect("a segment");
        let mut data = std::fs::read(&seg).expect("read");
        let middle = data.len() / 2;
        data[middle] ^= 0x04;
        std::fs::write(&seg, data).expect("write");
    }

    #[test]
    fn damage_is_quarantined_and_repair_keeps_term_and_vote_across_restarts() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path();
        filled(dir, &VOTERS);
        flip_a_bit_mid_segment(dir);

        let s = LogStorage::open(dir, LogOptions::default(), &VOTERS, true).expect("repairs");
        assert_eq!(s.repairing(), Some(40), "remembers what was committed");
        let hs = s.hard_state();
        assert_eq!((hs.term, hs.vote, hs.commit), (3, 2, 0));
        assert_eq!(s.persisted_last_index(), 0, "starts empty");
        assert!(dir.join(QUARANTINE_DIR).join(LOG_DIR).is_dir());
        drop(s);

        // A restart in the middle of the repair is still repairing.
        let mut s = LogStorage::open(dir, LogOptions::default(), &VOTERS, true).expect("reopen");
        assert_eq!(s.repairing(), Some(40));
        s.finish_repair().expect("finish");
        drop(s);
        let s = LogStorage::open(dir, LogOptions::default(), &VOTERS, true).expect("reopen");
        assert_eq!(s.repairing(), None);
    }

    #[test]
    fn a_lone_or_transient_replica_refuses_damage() {
        for (voters, durable) in [(&[1u64][..], true), (&VOTERS[..], false)] {
            let tmp = tempfile::tempdir().expect("tmp");
            let dir = tmp.path();
            filled(dir, voters);
            flip_a_bit_mid_segment(dir);
            let err = LogStorage::open(dir, LogOptions::default(), voters, durable)
                .err()
                .expect("nothing to repair from: refuse");
            assert!(err.to_string().contains("corrupt"), "{err}");
            assert!(!dir.join(QUARANTINE_DIR).exists());
        }
    }

    #[test]
    fn a_damaged_state_file_is_not_repaired() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path();
        filled(dir, &VOTERS);
        let path = dir.join(STATE_FILE);
        let mut data = std::fs::read(&path).expect("read");
        let last = data.len() - 1;
        data[last] ^= 0x01;
        std::fs::write(&path, data).expect("write");
        let err = LogStorage::open(dir, LogOptions::default(), &VOTERS, true)
            .err()
            .expect("term and vote are unknown: refuse");
        assert!(err.to_string().contains("state"), "{err}");
    }
}
