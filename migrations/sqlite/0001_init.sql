-- Idempotency records: one row per (tenant, key), in one of three states.
create table idempotency_records (
    tenant text not null,
    key text not null,
    fingerprint blob not null,
    token integer not null,
    created_at_ms integer not null,
    state text not null check (state in ('in_flight', 'completed', 'tombstone')),
    lease_expires_at_ms integer,
    completed_at_ms integer,
    response_status integer,
    response_content_type text,
    response_location text,
    response_body blob,
    resource_id text,
    primary key (tenant, key)
) without rowid;

create index idempotency_records_by_state on idempotency_records (state, completed_at_ms);

-- The last fencing token handed out; tokens only grow.
create table fencing (
    id integer primary key check (id = 1),
    last_token integer not null
);

insert into fencing (id, last_token) values (1, 0);

-- A payment is unique by the attempt that created it: (tenant, key, claim time).
create table payments (
    seq integer primary key autoincrement,
    tenant text not null,
    id text not null unique,
    idempotency_key text not null,
    claimed_at_ms integer not null,
    amount integer not null check (amount > 0),
    currency text not null,
    customer_id text not null,
    description text,
    metadata text not null,
    status text not null check (status in ('succeeded', 'failed')),
    amount_refunded integer not null check (amount_refunded between 0 and amount),
    reward_points integer not null,
    created_at_ms integer not null,
    unique (tenant, idempotency_key, claimed_at_ms)
);

create index payments_by_tenant on payments (tenant, seq);
create index payments_by_customer on payments (tenant, customer_id, seq);

create table refunds (
    seq integer primary key autoincrement,
    tenant text not null,
    id text not null unique,
    payment_id text not null references payments (id),
    idempotency_key text not null,
    claimed_at_ms integer not null,
    amount integer not null check (amount > 0),
    created_at_ms integer not null,
    unique (tenant, idempotency_key, claimed_at_ms)
);

create table reward_entries (
    seq integer primary key autoincrement,
    tenant text not null,
    id text not null unique,
    customer_id text not null,
    source text not null check (source in ('payment', 'refund')),
    payment_id text not null references payments (id),
    refund_id text references refunds (id),
    points integer not null,
    created_at_ms integer not null
);

create index reward_entries_by_customer on reward_entries (tenant, customer_id, seq);
