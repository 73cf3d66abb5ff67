//! The `keygate` command (work in progress).

fn main() {}
