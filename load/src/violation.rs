//! The broken promises a run can find, and the bounded list that collects them.

use std::fmt;

/// How many violations are kept with their details; beyond that they are only counted, so a
/// badly broken server cannot make the report (or the memory) explode.
pub const VIOLATIONS_KEPT_MAX: usize = 50;

/// The rule of the contract a violation broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// Every 201 of a key carries the same bytes.
    BodiesDiffer,
    /// At most one 201 of a key lacks `Idempotent-Replayed`.
    ExecutedTwice,
    /// Nothing can be replayed before the request that executed was even sent.
    ReplayBeforeExecution,
    /// A replay implies an execution, which the client saw unless an answer was lost.
    ReplayWithoutExecution,
    /// A 201 describes the request that was sent: its key and amount.
    AnswerForAnotherRequest,
    /// A valid request gets 201 (or 409 / 503); a reused key gets 422 `idempotency_key_reused`.
    UnexpectedStatus,
    /// A key that got a 201 holds exactly one payment on the server.
    PaymentsPerKey,
    /// That payment is the one the 201 described.
    StoredPaymentDiffers,
    /// A customer's balance is the sum of their ledger entries.
    BalanceNotLedgerSum,
    /// A customer's balance is what their created payments earned.
    BalanceNotPayments,
}

/// One broken promise: what broke, for which key or customer, and the evidence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub rule: Rule,
    /// The idempotency key or the customer id concerned.
    pub subject: String,
    pub detail: String,
}

impl Violation {
    /// A violation with its evidence.
    pub fn new(rule: Rule, subject: impl Into<String>, detail: impl Into<String>) -> Self {
        let (subject, detail) = (subject.into(), detail.into());
        Self {
            rule,
            subject,
            detail,
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} for `{}`: {}", self.rule, self.subject, self.detail)
    }
}

/// Violations: the first few in full, all of them counted.
#[derive(Debug, Default)]
pub struct Findings {
    pub kept: Vec<Violation>,
    pub count: u64,
}

impl Findings {
    /// Counts a violation and keeps it while fewer than [`VIOLATIONS_KEPT_MAX`] are kept.
    pub fn add(&mut self, violation: Violation) {
        self.count += 1;
        if self.kept.len() < VIOLATIONS_KEPT_MAX {
            self.kept.push(violation);
        }
    }

    /// The rules broken, in the order found; what the unit tests compare.
    #[cfg(test)]
    pub fn rules(&self) -> Vec<Rule> {
        self.kept.iter().map(|violation| violation.rule).collect()
    }
}
