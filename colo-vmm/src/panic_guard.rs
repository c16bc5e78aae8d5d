//! The threads that run a role (COLO primary or secondary, a migration) must not die silently:
//! a panic in one of their steps (a bug, an input nobody foresaw) becomes an error of that
//! role, which then ends the way it ends on any other error, with the reason in its status.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Runs `f`; a panic becomes `Err` with its message.
pub fn catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    // The caller gives up what `f` was working on: its state is not used again but to end the
    // role (pause, resume, report), which is what unwind safety asks for here.
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| format!("internal error: {}", message(p.as_ref())))
}

/// The text of a panic's payload.
pub fn message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_error_with_its_message() {
        assert_eq!(catch(|| 7), Ok(7));
        let e = catch(|| -> u32 { panic!("index {} out of range", 9) }).unwrap_err();
        assert_eq!(e, "internal error: index 9 out of range");
    }
}
