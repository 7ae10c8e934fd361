//! Which clock decides what.
//!
//! - **Deadlines** (renew deadline, kill deadline, expiry of another holder's record) are measured
//!   on the monotonic clock (`tokio::time::Instant`, CLOCK_MONOTONIC): it never jumps when NTP or a
//!   person sets the wall clock, and its rate is disciplined to within 500 ppm of real time, which
//!   the safety margin covers (see [`crate::timing::Timing`]).
//! - **Wall-clock** `MicroTime` values (`acquireTime`, `renewTime`) are written for people and
//!   other tools, and never compared with the local clock to decide anything.
//! - **Suspend**: CLOCK_MONOTONIC stops while the machine is suspended (a laptop running lease-exec
//!   by hand); other nodes' clocks do not, so our Lease may have expired for them long ago when we
//!   resume. The supervisor therefore also measures the time since the last renewal on
//!   CLOCK_BOOTTIME, which counts suspended time, and kills the command at once when that says the
//!   Lease may have expired.

use std::time::Duration;

/// CLOCK_BOOTTIME now: monotonic, and counting time spent suspended.
pub fn boot_time() -> Duration {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME) {
        Ok(t) => Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32),
        // Linux has had CLOCK_BOOTTIME since 2.6.39; should it fail, fall back to a clock that
        // never reports a suspend, so the monotonic deadlines alone apply.
        Err(_) => Duration::ZERO,
    }
}
