//! `hello`: the smallest end-to-end check of boot, console and exit.

use core::fmt::Write;

use crate::cmdline::{CmdlineError, Options};
use crate::console::Console;

pub fn run<'a>(console: &mut Console, mut options: Options<'a>) -> Result<(), CmdlineError<'a>> {
    if let Some(option) = options.next() {
        let (key, _) = option?;
        return Err(CmdlineError::UnknownOption {
            workload: "hello",
            key,
        });
    }
    let _ = writeln!(console, "Hello from the cowvm test guest!");
    Ok(())
}
