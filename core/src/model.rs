//! The reference model: what a store must answer, restated as plainly as possible.
//!
//! Property tests drive every store and the HTTP service with random sequences of [`Op`]s and
//! hold each answer to the one this model gives. The model knows nothing of the engine's code:
//! it is a second, independent statement of the contract, with time in whole milliseconds.

use std::collections::BTreeMap;

/// A model key: (tenant index, key index).
pub type ModelKey = (u8, u8);

/// One step of a test sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// A request with key `key` of tenant `tenant` and body variant `body`.
    Begin {
        /// Which tenant sends it.
        tenant: u8,
        /// Which key it carries.
        key: u8,
        /// Which payload it carries; another value is another fingerprint.
        body: u8,
    },
    /// The `n`-th open owner (modulo their number) commits its outcome.
    Complete(usize),
    /// The `n`-th open owner fails before committing and releases its key.
    Release(usize),
    /// The `n`-th open owner dies without a word.
    Crash(usize),
    /// The `n`-th open owner renews its lease (the heartbeat of a slow but live owner).
    Renew(usize),
    /// Time moves forward.
    Tick(u64),
    /// The retention sweeper runs.
    Sweep,
}

/// What the model says an operation must answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expected {
    /// Execute; `took_over` when an expired owner was displaced.
    Execute {
        /// Whether the lease was taken from an expired owner.
        took_over: bool,
    },
    /// Replay the response numbered `response`.
    Replay {
        /// The number of the completion whose response is replayed.
        response: u64,
    },
    /// Someone else is executing; retry after this many seconds.
    InFlight {
        /// Whole seconds, rounded up, at least 1.
        retry_after_secs: u64,
    },
    /// The key is bound to another payload.
    Reused,
    /// The key's retention is over.
    Expired,
    /// The completion was accepted and got this response number.
    Completed {
        /// The number given to the stored response.
        response: u64,
    },
    /// The owner had lost its lease; nothing was stored.
    Fenced,
    /// The lease was renewed.
    Renewed,
    /// The sweeper turned this many responses into tombstones and deleted this many records.
    Swept {
        /// Completed records whose body was dropped.
        tombstoned: u64,
        /// Records deleted.
        deleted: u64,
    },
    /// Nothing to observe (release, crash, tick, or no owner to act on).
    Nothing,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    Running { owner: u64, lease_until_ms: u64 },
    Done { at_ms: u64, response: u64 },
    Gone { at_ms: u64 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    body: u8,
    phase: Phase,
}

/// An owner that a test client holds: the key it claimed and the model's id of its lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    /// The key claimed.
    pub key: ModelKey,
    /// The model's id of this lease.
    pub id: u64,
}

/// The state of the reference model.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Model {
    /// The lease in milliseconds.
    pub lease_ms: u64,
    /// The retention in milliseconds.
    pub retention_ms: u64,
    /// The tombstone retention in milliseconds.
    pub tombstone_ms: u64,
    /// Milliseconds since the test began.
    pub now_ms: u64,
    entries: BTreeMap<ModelKey, Entry>,
    /// Owners still holding a lease, oldest first.
    pub owners: Vec<Owner>,
    /// How many completions each key has had, i.e. how many payments it may have.
    pub completions: BTreeMap<ModelKey, u64>,
    next_id: u64,
}

impl Model {
    /// An empty model with these limits.
    pub fn new(lease_ms: u64, retention_ms: u64, tombstone_ms: u64) -> Self {
        Self {
            lease_ms,
            retention_ms,
            tombstone_ms,
            ..Self::default()
        }
    }

    /// Applies `op` and returns what the system under test must answer.
    pub fn apply(&mut self, op: &Op) -> Expected {
        match *op {
            Op::Begin { tenant, key, body } => self.begin((tenant, key), body),
            Op::Complete(n) => self.complete(n),
            Op::Release(n) => {
                if let Some(owner) = self.take_owner(n) {
                    self.release(&owner);
                }
                Expected::Nothing
            }
            Op::Crash(n) => {
                self.take_owner(n);
                Expected::Nothing
            }
            Op::Tick(ms) => {
                self.now_ms += ms;
                Expected::Nothing
            }
            Op::Renew(n) => self.renew(n),
            Op::Sweep => self.sweep(),
        }
    }

    /// The owner `Op::Complete(n)` and friends refer to, without removing it.
    pub fn owner(&self, n: usize) -> Option<&Owner> {
        if self.owners.is_empty() {
            None
        } else {
            self.owners.get(n % self.owners.len())
        }
    }

    fn take_owner(&mut self, n: usize) -> Option<Owner> {
        if self.owners.is_empty() {
            return None;
        }
        let index = n % self.owners.len();
        Some(self.owners.remove(index))
    }

    fn fresh_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn claim(&mut self, key: ModelKey, body: u8, took_over: bool) -> Expected {
        let id = self.fresh_id();
        let lease_until_ms = self.now_ms + self.lease_ms;
        let phase = Phase::Running {
            owner: id,
            lease_until_ms,
        };
        self.entries.insert(key, Entry { body, phase });
        self.owners.push(Owner { key, id });
        Expected::Execute { took_over }
    }

    fn begin(&mut self, key: ModelKey, body: u8) -> Expected {
        let now = self.now_ms;
        let Some(entry) = self.entries.get(&key).cloned() else {
            return self.claim(key, body, false);
        };
        match entry.phase {
            Phase::Gone { at_ms } if now >= at_ms + self.retention_ms + self.tombstone_ms => {
                self.claim(key, body, false)
            }
            Phase::Gone { .. } => Expected::Expired,
            Phase::Done { at_ms, .. } if now >= at_ms + self.retention_ms => Expected::Expired,
            Phase::Done { .. } | Phase::Running { .. } if entry.body != body => Expected::Reused,
            Phase::Done { response, .. } => Expected::Replay { response },
            Phase::Running { lease_until_ms, .. } if now >= lease_until_ms => {
                self.claim(key, body, true)
            }
            Phase::Running { lease_until_ms, .. } => Expected::InFlight {
                retry_after_secs: (lease_until_ms - now).div_ceil(1000).max(1),
            },
        }
    }

    fn complete(&mut self, n: usize) -> Expected {
        let Some(owner) = self.take_owner(n) else {
            return Expected::Nothing;
        };
        let owns = matches!(
            self.entries.get(&owner.key),
            Some(Entry { phase: Phase::Running { owner: id, .. }, .. }) if *id == owner.id
        );
        if !owns {
            return Expected::Fenced;
        }
        let response = self.fresh_id();
        let at_ms = self.now_ms;
        if let Some(entry) = self.entries.get_mut(&owner.key) {
            entry.phase = Phase::Done { at_ms, response };
        }
        *self.completions.entry(owner.key).or_default() += 1;
        Expected::Completed { response }
    }

    fn release(&mut self, owner: &Owner) {
        let owns = matches!(
            self.entries.get(&owner.key),
            Some(Entry { phase: Phase::Running { owner: id, .. }, .. }) if *id == owner.id
        );
        if owns {
            self.entries.remove(&owner.key);
        }
    }

    fn renew(&mut self, n: usize) -> Expected {
        let Some(owner) = self.owner(n).cloned() else {
            return Expected::Nothing;
        };
        let lease_until = self.now_ms + self.lease_ms;
        match self.entries.get_mut(&owner.key) {
            Some(Entry {
                phase:
                    Phase::Running {
                        owner: id,
                        lease_until_ms,
                    },
                ..
            }) if *id == owner.id => {
                *lease_until_ms = lease_until;
                Expected::Renewed
            }
            _ => Expected::Fenced,
        }
    }

    fn sweep(&mut self) -> Expected {
        let now = self.now_ms;
        let (retention, tombstone) = (self.retention_ms, self.tombstone_ms);
        let before = self.entries.len() as u64;
        self.entries.retain(|_, entry| match entry.phase {
            Phase::Running { lease_until_ms, .. } => now < lease_until_ms + retention,
            Phase::Done { at_ms, .. } | Phase::Gone { at_ms } => {
                now < at_ms + retention + tombstone
            }
        });
        let deleted = before - self.entries.len() as u64;
        let mut tombstoned = 0;
        for entry in self.entries.values_mut() {
            if let Phase::Done { at_ms, .. } = entry.phase
                && now >= at_ms + retention
            {
                entry.phase = Phase::Gone { at_ms };
                tombstoned += 1;
            }
        }
        Expected::Swept {
            tombstoned,
            deleted,
        }
    }

    /// Where a key stands: `None` when absent, else `in_flight`, `completed` or `tombstone`.
    pub fn state_of(&self, key: ModelKey) -> Option<&'static str> {
        self.entries.get(&key).map(|entry| match entry.phase {
            Phase::Running { .. } => "in_flight",
            Phase::Done { .. } => "completed",
            Phase::Gone { .. } => "tombstone",
        })
    }

    /// Every key the model has a record for.
    pub fn keys(&self) -> impl Iterator<Item = ModelKey> + '_ {
        self.entries.keys().copied()
    }
}
