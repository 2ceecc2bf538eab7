//! The JSON shapes of the HTTP contract, shared by the server and the client SDK.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::time::Timestamp;

macro_rules! string_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            /// The value as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(value: &str) -> Self {
                Self(value.to_owned())
            }
        }
    };
}

string_newtype!(
    /// A merchant: every object and idempotency record belongs to exactly one.
    TenantId
);
string_newtype!(
    /// A payment's id, `pay_` followed by random characters.
    PaymentId
);
string_newtype!(
    /// A refund's id, `re_` followed by random characters.
    RefundId
);
string_newtype!(
    /// A reward ledger entry's id, `rwd_` followed by random characters.
    RewardEntryId
);
string_newtype!(
    /// The merchant's own id of a customer: 1 ..= 64 of `[A-Za-z0-9_-]`.
    CustomerId
);
string_newtype!(
    /// An ISO 4217 currency code.
    Currency
);

/// An amount of money as an integer count of the currency's minor units (cents).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct MinorUnits(pub i64);

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        crate::time::parse_rfc3339(&text)
            .ok_or_else(|| serde::de::Error::custom("expected an RFC 3339 UTC timestamp"))
    }
}

/// The body of `POST /v1/payments`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreatePayment {
    /// The amount in minor units, 1 ..= 100_000_000_000.
    pub amount: MinorUnits,
    /// Three upper-case letters from ISO 4217.
    pub currency: Currency,
    /// Who pays; earns the reward points.
    pub customer_id: CustomerId,
    /// Free text, at most 500 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// At most 20 string entries.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// The body of `POST /v1/payments/{id}/refunds`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRefund {
    /// How much to refund; what is left when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<MinorUnits>,
}

/// A payment's final state as the simulated processor decided it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentStatus {
    /// Charged; reward points credited.
    Succeeded,
    /// Declined by the processor; nothing charged, not refundable.
    Failed,
}

impl PaymentStatus {
    /// The status as stored and sent: `succeeded` or `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
        }
    }

    /// Reads a status written by [`PaymentStatus::as_str`].
    pub fn parse(text: &str) -> Option<Self> {
        [Self::Succeeded, Self::Failed]
            .into_iter()
            .find(|s| s.as_str() == text)
    }
}

/// A payment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payment {
    /// `pay_...`
    pub id: PaymentId,
    /// Always `payment`.
    pub object: ObjectKind<'p'>,
    /// The amount charged, in minor units.
    pub amount: MinorUnits,
    /// The currency of `amount`.
    pub currency: Currency,
    /// Who paid.
    pub customer_id: CustomerId,
    /// The description given at creation.
    pub description: Option<String>,
    /// The metadata given at creation.
    pub metadata: BTreeMap<String, String>,
    /// Succeeded or failed.
    pub status: PaymentStatus,
    /// How much of `amount` has been refunded so far.
    pub amount_refunded: MinorUnits,
    /// Reward points the customer holds for this payment now.
    pub reward_points: i64,
    /// The idempotency key that created the payment.
    pub idempotency_key: String,
    /// When the payment was created.
    pub created_at: Timestamp,
}

/// A refund of part or all of a payment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refund {
    /// `re_...`
    pub id: RefundId,
    /// Always `refund`.
    pub object: ObjectKind<'r'>,
    /// The payment refunded.
    pub payment_id: PaymentId,
    /// The amount refunded, in minor units.
    pub amount: MinorUnits,
    /// When the refund was created.
    pub created_at: Timestamp,
}

/// What moved a customer's reward points.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardSource {
    /// A succeeded payment credited points.
    Payment,
    /// A refund took points back.
    Refund,
}

impl RewardSource {
    /// The source as stored and sent: `payment` or `refund`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Payment => "payment",
            Self::Refund => "refund",
        }
    }

    /// Reads a source written by [`RewardSource::as_str`].
    pub fn parse(text: &str) -> Option<Self> {
        [Self::Payment, Self::Refund]
            .into_iter()
            .find(|s| s.as_str() == text)
    }
}

/// One change to a customer's reward points.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RewardEntry {
    /// `rwd_...`
    pub id: RewardEntryId,
    /// Payment credit or refund debit.
    pub source: RewardSource,
    /// The payment concerned.
    pub payment_id: PaymentId,
    /// The refund, for a debit.
    pub refund_id: Option<RefundId>,
    /// Points added (positive) or taken back (negative).
    pub points: i64,
    /// When the entry was written.
    pub created_at: Timestamp,
}

/// A customer's reward points: the balance is the sum of the entries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rewards {
    /// The customer.
    pub customer_id: CustomerId,
    /// The sum of all entries' points.
    pub points_balance: i64,
    /// Every entry, newest first.
    pub entries: Vec<RewardEntry>,
}

/// One page of a list, newest first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct List<T> {
    /// Always `list`.
    pub object: ObjectKind<'l'>,
    /// The page's items.
    pub data: Vec<T>,
    /// Whether more items follow the last one.
    pub has_more: bool,
}

/// What `GET /v1/idempotency-keys/{key}` reports of a key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyStatus {
    /// The key.
    pub key: String,
    /// `in_progress`, `completed` or `expired`.
    pub state: KeyState,
    /// The SHA-256 fingerprint of the request bound to the key, in hex.
    pub fingerprint: String,
    /// When the key was first used.
    pub created_at: Timestamp,
    /// When the lease (in progress), the replay (completed) or the tombstone (expired) ends.
    pub expires_at: Timestamp,
    /// The stored status code, once completed.
    pub response_status: Option<u16>,
    /// The id of the object the request created, once completed.
    pub resource_id: Option<String>,
}

/// Where a key stands, as clients see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyState {
    /// The original request is still running.
    InProgress,
    /// The response is stored and replayed.
    Completed,
    /// Retention ended; a retry is refused.
    Expired,
}

/// A request field that failed validation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    /// The field, e.g. `amount` or `metadata.note`; `body` for the body as a whole.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

/// An RFC 9457 problem document, the body of every error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// `/problems/<code>`.
    #[serde(rename = "type")]
    pub type_: String,
    /// A short summary of the kind of problem.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What happened to this request.
    pub detail: String,
    /// The stable machine-readable code clients branch on.
    pub code: String,
    /// The fields at fault, for `invalid_request`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
    /// The payment concerned, where there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_id: Option<String>,
}

/// A constant `object` tag: `payment`, `refund` or `list`, chosen by the letter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ObjectKind<const TAG: char>;

impl<const TAG: char> ObjectKind<TAG> {
    fn name() -> &'static str {
        match TAG {
            'p' => "payment",
            'r' => "refund",
            _ => "list",
        }
    }
}

impl<const TAG: char> Serialize for ObjectKind<TAG> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(Self::name())
    }
}

impl<'de, const TAG: char> Deserialize<'de> for ObjectKind<TAG> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        if text == Self::name() {
            Ok(Self)
        } else {
            Err(serde::de::Error::custom(format!(
                "expected object \"{}\"",
                Self::name()
            )))
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn objects_carry_their_tag_and_refuse_another() {
        let list: List<u8> = List {
            object: ObjectKind,
            data: vec![],
            has_more: false,
        };
        assert_eq!(
            serde_json::to_string(&list).unwrap(),
            r#"{"object":"list","data":[],"has_more":false}"#
        );
        assert_eq!(
            serde_json::to_string(&ObjectKind::<'p'>).unwrap(),
            r#""payment""#
        );
        assert_eq!(
            serde_json::to_string(&ObjectKind::<'r'>).unwrap(),
            r#""refund""#
        );
        assert!(serde_json::from_str::<ObjectKind<'p'>>(r#""payment""#).is_ok());
        assert!(serde_json::from_str::<ObjectKind<'p'>>(r#""refund""#).is_err());
    }

    #[test]
    fn statuses_and_sources_are_written_and_read_back_by_name() {
        for status in [PaymentStatus::Succeeded, PaymentStatus::Failed] {
            let wire = serde_json::to_string(&status).unwrap();
            assert_eq!(wire, format!("\"{}\"", status.as_str()));
            assert_eq!(PaymentStatus::parse(status.as_str()), Some(status));
        }
        for source in [RewardSource::Payment, RewardSource::Refund] {
            let wire = serde_json::to_string(&source).unwrap();
            assert_eq!(wire, format!("\"{}\"", source.as_str()));
            assert_eq!(RewardSource::parse(source.as_str()), Some(source));
        }
        assert_eq!(PaymentStatus::parse("pending"), None);
        assert_eq!(RewardSource::parse("bonus"), None);
    }

    #[test]
    fn timestamps_travel_as_rfc3339_and_come_back() {
        let at = Timestamp(1_796_378_400_123);
        let json = serde_json::to_string(&at).unwrap();
        assert_eq!(json, r#""2026-12-04T10:00:00.123Z""#);
        assert_eq!(serde_json::from_str::<Timestamp>(&json).unwrap(), at);
        assert!(serde_json::from_str::<Timestamp>(r#""yesterday""#).is_err());
    }
}
