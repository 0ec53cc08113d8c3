//! Guest-harness additions for network tests (namespaces, taps, bridges).
