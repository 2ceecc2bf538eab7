//! The HTTP contract, driven in process through the real router over the memory and SQLite
//! stores: snapshots of every status path, the known fault cases, and the money invariants.

mod cases;
mod contract;
mod harness;
mod model;
mod money;
mod surface;
