//! The Lease: its record ([`record`]), pure decisions ([`decide`]) and the acquisition state
//! machine ([`campaign`]) with its retry schedule ([`backoff`]), bounded API calls ([`api`]), one
//! watch for every caller ([`watch`]), and the loops that act on them: [`acquire`] (waiting
//! until we hold it), [`renew`] (keeping it while the command runs) and [`release`] (giving it
//! back).

pub mod acquire;
pub mod api;
pub mod backoff;
pub mod campaign;
pub mod decide;
pub mod proxy;
pub mod record;
pub mod release;
pub mod renew;
pub mod watch;

pub use api::{ApiError, LeaseApi};
pub use decide::{Claimant, Decision};
pub use record::Record;
