//! Guest-harness additions for console tests (QEMU 11 chroot, port sockets).
