//! Placeholder until the guest harness lands.
