//! Test harnesses for the project's vhost-user backends.
//!
//! - [`frontend`]: a vhost-user frontend and guest driver in one, driving a backend over
//!   its socket without a VM (memfd guest RAM, hand-built split rings);
//! - [`guest`]: boots a real QEMU guest with backends attached and runs a script in it.

pub mod frontend;
pub mod guest;
pub mod guest_console;
pub mod guest_net;
