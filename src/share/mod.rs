//! Sharing files, the way `qpunch send` and `qpunch receive` do it, for apps that embed
//! qpunch.

pub mod consent;
