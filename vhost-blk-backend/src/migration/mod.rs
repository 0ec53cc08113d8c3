//! Live block migration between two vhost-blk-backends (in progress): the stream they
//! speak. Dirty block tracking lives in [`crate::dirty`] and [`crate::dirty_file`].

pub mod stream;
