-- Idempotency records: one row per (tenant, key), in one of three states.
-- Times are milliseconds since the Unix epoch taken from the database's clock, so that every
-- process sharing the database judges leases and retention by the same clock.
create table idempotency_records (
    tenant text not null,
    key text not null,
    fingerprint bytea not null check (length(fingerprint) = 32),
    token bigint not null,
    created_at_ms bigint not null,
    state text not null check (state in ('in_flight', 'completed', 'tombstone')),
    lease_expires_at_ms bigint,
    completed_at_ms bigint,
    response_status integer,
    response_content_type text,
    response_location text,
    response_body bytea,
    resource_id text,
    primary key (tenant, key),
    check ((state = 'in_flight') = (lease_expires_at_ms is not null)),
    check ((state = 'in_flight') = (completed_at_ms is null))
);

-- The sweeper looks for abandoned leases and for completions past retention.
create index idempotency_records_by_lease
    on idempotency_records (lease_expires_at_ms) where state = 'in_flight';
create index idempotency_records_by_completion
    on idempotency_records (state, completed_at_ms) where state <> 'in_flight';

-- Fencing tokens: a sequence is shared by every process and only grows. Values skipped by a
-- transaction that rolled back are simply never used.
create sequence fencing_tokens as bigint;

-- A payment is unique by the attempt that created it: (tenant, key, claim time).
create table payments (
    seq bigint generated always as identity primary key,
    tenant text not null,
    id text not null unique,
    idempotency_key text not null,
    claimed_at_ms bigint not null,
    amount bigint not null check (amount > 0),
    currency text not null,
    customer_id text not null,
    description text,
    metadata text not null,
    status text not null check (status in ('succeeded', 'failed')),
    amount_refunded bigint not null check (amount_refunded between 0 and amount),
    reward_points bigint not null,
    created_at_ms bigint not null,
    constraint payments_one_per_attempt unique (tenant, idempotency_key, claimed_at_ms)
);

create index payments_by_tenant on payments (tenant, seq);
create index payments_by_customer on payments (tenant, customer_id, seq);

create table refunds (
    seq bigint generated always as identity primary key,
    tenant text not null,
    id text not null unique,
    payment_id text not null references payments (id),
    idempotency_key text not null,
    claimed_at_ms bigint not null,
    amount bigint not null check (amount > 0),
    created_at_ms bigint not null,
    constraint refunds_one_per_attempt unique (tenant, idempotency_key, claimed_at_ms)
);

create index refunds_by_payment on refunds (payment_id);

create table reward_entries (
    seq bigint generated always as identity primary key,
    tenant text not null,
    id text not null unique,
    customer_id text not null,
    source text not null check (source in ('payment', 'refund')),
    payment_id text not null references payments (id),
    refund_id text references refunds (id),
    points bigint not null,
    created_at_ms bigint not null
);

create index reward_entries_by_customer on reward_entries (tenant, customer_id, seq);
create index reward_entries_by_payment on reward_entries (payment_id);
